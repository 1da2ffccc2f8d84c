"""The one experiment loop: points in, one row per point out, resumable by key.

Sweeps (:func:`efficient_attn.sweep.runner.run_sweep`), studies
(:func:`efficient_attn.studies.base.run_points`) and the quality grid
(:func:`efficient_attn.studies.quality.run_grid`) all run through :func:`run_points`:

* a *point* is a dict with ``key`` (stable identity, stored with its row),
  ``label`` (for the progress log) and optionally ``family`` and ``seq_len``
  (a family's points differ only in length);
* an :class:`Executor` turns a point into a row: ``execute(point)`` (a worker
  process for sweeps and studies, in-process training for the quality grid)
  returns the row, a crash, kill, out-of-memory or timeout included
  (``status`` ``error``/``oom``), and ``new_row(point, status, message)`` makes
  the rows the loop writes itself;
* rows go to one store (:mod:`efficient_attn.sweep.results`): appended with
  ``fsync`` as each point finishes, so a killed run loses at most the point in
  flight and re-running skips every key already written (``retry_errors``:
  except errors);
* a point whose family ran out of memory or time at a shorter length is
  recorded with that status, without running (``skip_infeasible``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from efficient_attn.sweep import results
from efficient_attn.sweep.worker import environment, utc_now


@dataclasses.dataclass
class Outcome:
    """What one run of the loop did."""

    path: Path
    ran: int
    skipped: int
    statuses: Counter


@dataclasses.dataclass(frozen=True)
class Executor:
    """How the loop measures a point and writes the rows it makes itself.

    Attributes:
      execute: ``execute(point) -> row``; never raises for a failing point.
      new_row: ``new_row(point, status, message) -> row`` with the point's identity.
      describe: ``describe(row) -> str``: a few words on a finished row (progress log).
      family: ``family(point or row) -> str | None``: points that differ only in length.
    """

    execute: Callable[[dict[str, Any]], dict[str, Any]]
    new_row: Callable[[dict[str, Any], str, str], dict[str, Any]]
    describe: Callable[[dict[str, Any]], str]
    family: Callable[[Mapping[str, Any]], str | None] = lambda d: d.get("family")


def _fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Progress bar on ``stream`` with the current point and an ETA.

    On a terminal the bar is redrawn in place; elsewhere (batch logs) one line
    is written per finished point. The ETA scales with sequence length (a
    library bar's mean-per-item ETA would be far off when lengths grow).
    """

    def __init__(self, points: Sequence[Mapping[str, Any]], stream: TextIO | None, width=24):
        self.points, self.stream, self.width = points, stream, width
        self.tty = bool(stream is not None and stream.isatty())
        self.start = time.perf_counter()
        self.seconds: dict[int, list[float]] = {}

    def eta(self, done: int) -> float | None:
        """Remaining seconds: the mean per point at each length; at a longer length, the
        fastest point's time (start-up) plus the rest scaled linearly from the longest seen."""
        if not self.seconds:
            return None
        mean = {t: sum(s) / len(s) for t, s in self.seconds.items()}
        longest = max(mean)
        fixed = min(min(s) for s in self.seconds.values())
        work = mean[longest] - fixed
        return sum(
            mean.get(t, fixed + work * t / max(longest, 1))
            for t in (int(p.get("seq_len") or 0) for p in self.points[done:])
        )

    def _bar(self, done: int) -> str:
        total = len(self.points)
        filled = int(self.width * done / max(total, 1))
        eta = self.eta(done)
        return (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
            f"{_fmt_duration(time.perf_counter() - self.start)} elapsed, "
            f"ETA {'?' if eta is None else _fmt_duration(eta)}"
        )

    def started(self, index: int, point: Mapping[str, Any]) -> None:
        if self.tty:
            self.stream.write(f"\r\033[K{self._bar(index)} | {point['label']}")
            self.stream.flush()

    def finished(self, index: int, point: Mapping[str, Any], summary: str, seconds: float):
        self.seconds.setdefault(int(point.get("seq_len") or 0), []).append(seconds)
        if self.stream is None:
            return
        line = f"{point['label']}: {summary} ({seconds:.1f} s)"
        if self.tty:
            self.stream.write(f"\r\033[K  {line}\n{self._bar(index + 1)}")
        else:
            self.stream.write(f"{self._bar(index + 1)} | {line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _infeasible_families(
    rows: Mapping[str, dict[str, Any]], family: Callable[[Mapping[str, Any]], str | None]
) -> dict[str, dict[str, Any]]:
    """family -> the shortest row of that family that ran out of memory or time."""
    failed: dict[str, dict[str, Any]] = {}
    for row in rows.values():
        if not results.infeasible(row) or row.get("skipped"):
            continue
        name = family(row)
        if name and (name not in failed or row["seq_len"] < failed[name]["seq_len"]):
            failed[name] = row
    return failed


def _summary(row: dict[str, Any], describe: Callable[[dict[str, Any]], str]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {str(row.get('message', ''))[:100]}"
    return f"ok {describe(row)}"


def run_points(
    points: Sequence[dict[str, Any]],
    out_dir: str | Path,
    executor: Executor,
    *,
    name: str,
    results_file: str = results.RESULTS,
    retry_errors: bool = False,
    skip_infeasible: bool = True,
    stream: TextIO | None = sys.stderr,
    meta: dict[str, Any] | None = None,
) -> Outcome:
    """Run the points whose key has no row in ``out_dir`` yet; one row each, as it finishes.

    ``name`` heads the progress log; ``meta`` is written to ``DIR/sweep.json``.
    Rows without ``env`` get the environment of the last row that had one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    latest = results.latest_rows(out_dir)
    done = {k for k, r in latest.items() if not (retry_errors and r["status"] == "error")}
    failed = _infeasible_families(latest, executor.family) if skip_infeasible else {}
    todo = [p for p in points if p["key"] not in done]
    path = out_dir / results_file
    if meta is not None:
        results.write_meta(out_dir, meta)
    if stream is not None:
        stream.write(
            f"{name}: {len(points)} points, {len(points) - len(todo)} already in {out_dir}, "
            f"running {len(todo)} -> {path}\n"
        )
    progress = Progress(todo, stream)
    fallback_env = environment(devices=False)
    statuses: Counter = Counter()
    for i, point in enumerate(todo):
        progress.started(i, point)
        start = time.perf_counter()
        family = executor.family(point) if skip_infeasible else None
        shorter = failed.get(family) if family else None
        if shorter is not None and shorter["seq_len"] < point["seq_len"]:
            first = (str(shorter.get("message") or "").splitlines() or [""])[0][:300]
            row = executor.new_row(
                point,
                shorter["status"],
                f"not run: this method was infeasible at the shorter length "
                f"{shorter['seq_len']} ({shorter['status']}: {first})",
            )
            row["skipped"] = True
        else:
            row = executor.execute(point)
            if family and results.infeasible(row):
                failed.setdefault(family, row)
        if row.get("env"):
            fallback_env = row["env"]
        else:
            row["env"] = {**fallback_env, "date": utc_now()}
        results.append_row(path, row)
        statuses[row["status"]] += 1
        summary = _summary(row, executor.describe) if stream is not None else ""
        progress.finished(i, point, summary, time.perf_counter() - start)
    progress.close()
    return Outcome(path=path, ran=len(todo), skipped=len(points) - len(todo), statuses=statuses)
