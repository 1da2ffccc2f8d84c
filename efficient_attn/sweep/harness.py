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
* several processes may share one directory (terminals, array jobs without
  ``--shard``): a point is claimed before it runs (:mod:`efficient_attn.sweep.claims`),
  live claims are left to their process, dead ones taken over, and a point is
  never recorded twice; ``DIR/sweep.json`` lists the points for
  ``efficient-attn sweep --status DIR`` (:mod:`efficient_attn.sweep.status`);
* a point whose family ran out of memory or time at a shorter length is
  recorded with that status, without running (``skip_infeasible``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from efficient_attn.sweep import claims, results
from efficient_attn.sweep.worker import environment, utc_now


@dataclasses.dataclass
class Outcome:
    """What one run of the loop did."""

    path: Path
    ran: int
    skipped: int
    statuses: Counter
    elsewhere: int = 0  # points left running in other processes


@dataclasses.dataclass(frozen=True)
class Executor:
    """How the loop measures a point and writes the rows it makes itself.

    Attributes:
      execute: ``execute(point) -> row``; never raises for a failing point.
      new_row: ``new_row(point, status, message) -> row`` with the point's identity.
      describe: ``describe(row) -> str``: a few words on a finished row (progress log).
      family: ``family(point or row) -> str | None``: points that differ only in length.
      timeout_s: the longest a point may run (None: no limit); a claim whose heartbeat
        stopped for this plus :data:`efficient_attn.sweep.claims.STALE_MARGIN_S` is dead.
    """

    execute: Callable[[dict[str, Any]], dict[str, Any]]
    new_row: Callable[[dict[str, Any], str, str], dict[str, Any]]
    describe: Callable[[dict[str, Any]], str]
    family: Callable[[Mapping[str, Any]], str | None] = lambda d: d.get("family")
    timeout_s: float | None = None


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def estimate(seconds: Mapping[int, Sequence[float]], lengths: Sequence[int]) -> float | None:
    """Seconds to run points of ``lengths``, given the seconds points took per length.

    The mean per point at each length; at a longer length, the fastest point's time
    (start-up) plus the rest scaled linearly from the longest seen. None without data.
    """
    seconds = {t: s for t, s in seconds.items() if s}
    if not seconds:
        return None
    mean = {t: sum(s) / len(s) for t, s in seconds.items()}
    longest = max(mean)
    fixed = min(min(s) for s in seconds.values())
    work = mean[longest] - fixed
    return sum(mean.get(t, fixed + work * t / max(longest, 1)) for t in lengths)


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
        """Remaining seconds of the points after the first ``done`` (:func:`estimate`)."""
        return estimate(self.seconds, [int(p.get("seq_len") or 0) for p in self.points[done:]])

    def _bar(self, done: int) -> str:
        total = len(self.points)
        filled = int(self.width * done / max(total, 1))
        eta = self.eta(done)
        return (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
            f"{fmt_duration(time.perf_counter() - self.start)} elapsed, "
            f"ETA {'?' if eta is None else fmt_duration(eta)}"
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


def _changed(out_dir: Path, key: str, before: dict[str, Any] | None) -> bool:
    """Whether ``key``'s latest row is no longer ``before``: another process recorded it."""
    return results.latest_rows(out_dir).get(key) != before


def _point_list(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What ``--status`` needs of each point: key, label and length."""
    fields = ("key", "label", "seq_len")
    return [{k: p[k] for k in fields if p.get(k) is not None} for p in points]


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
    all_points: Sequence[dict[str, Any]] | None = None,
) -> Outcome:
    """Run the points whose key has no row in ``out_dir`` yet; one row each, as it finishes.

    Several processes may run on one ``out_dir``: each point is claimed first
    (:mod:`efficient_attn.sweep.claims`); points a live process holds are left
    to it, dead claims are taken over, and a point recorded by another process
    since this one listed the directory is not run (checked after claiming, and
    again under the results file's lock before appending).

    ``name`` heads the progress log; ``meta`` and the point list (``all_points``,
    default ``points``: key, label, length) are written to ``DIR/sweep.json``.
    Rows without ``env`` get the environment of the last row that had one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = results.latest_rows(out_dir)
    done = {k for k, r in listed.items() if not (retry_errors and r["status"] == "error")}
    todo = [p for p in points if p["key"] not in done]
    claims.remove_dead(out_dir, done)  # left by processes killed after recording
    path = out_dir / results_file
    point_list = _point_list(points if all_points is None else all_points)
    results.write_meta(out_dir, {**(meta or {"name": name}), "point_list": point_list})
    if stream is not None:
        stream.write(
            f"{name}: {len(points)} points, {len(points) - len(todo)} already in {out_dir}, "
            f"running {len(todo)} -> {path}\n"
        )
    progress = Progress(todo, stream)
    fallback_env = environment(devices=False)
    statuses: Counter = Counter()
    ran = 0
    pending = list(todo)
    with claims.Claims(out_dir, (executor.timeout_s or 0) + claims.STALE_MARGIN_S) as held:
        while pending:
            busy = []
            for point in pending:
                key = point["key"]
                got = held.acquire(key, point.get("label", ""))
                if got is None:  # a live process runs it
                    busy.append(point)
                    continue
                latest = results.latest_rows(out_dir)
                if latest.get(key) != listed.get(key):  # another process recorded it meanwhile
                    held.release(key)
                    continue
                # the bar counts the points recorded by any process since this one started
                resolved = sum(latest.get(p["key"]) != listed.get(p["key"]) for p in todo)
                if got.took_over is not None and stream is not None:
                    old, erase = got.took_over, "\r\033[K" if progress.tty else ""
                    stream.write(f"{erase}took over {point['label']} from {old.host} "
                                 f"pid {old.pid} ({got.reason})\n")  # fmt: skip
                progress.started(resolved, point)
                start = time.perf_counter()
                failed = _infeasible_families(latest, executor.family) if skip_infeasible else {}
                row = _run_one(point, executor, failed.get(executor.family(point) or ""))
                if row.get("env"):
                    fallback_env = row["env"]
                else:
                    row["env"] = {**fallback_env, "date": utc_now()}
                recorded = results.append_row(
                    path, row, unless=functools.partial(_changed, out_dir, key, listed.get(key))
                )
                held.release(key)
                if recorded:
                    ran += 1
                    statuses[row["status"]] += 1
                summary = _summary(row, executor.describe) if stream is not None else ""
                if not recorded:
                    summary = "not recorded: another process recorded this point meanwhile"
                progress.finished(resolved, point, summary, time.perf_counter() - start)
            if len(busy) == len(pending):  # nothing claimable: the rest runs elsewhere
                break
            pending = busy
    progress.close()
    if pending and stream is not None:
        stream.write(
            f"{len(pending)} point{'s' * (len(pending) > 1)} running in other processes "
            f"(efficient-attn sweep --status {out_dir})\n"
        )
    return Outcome(
        path=path,
        ran=ran,
        skipped=len(points) - ran - len(pending),
        statuses=statuses,
        elsewhere=len(pending),
    )


def _run_one(
    point: dict[str, Any], executor: Executor, shorter: dict[str, Any] | None
) -> dict[str, Any]:
    """The point's row: measured, or infeasible without running (``shorter`` failed)."""
    if shorter is None or shorter["seq_len"] >= point["seq_len"]:
        return executor.execute(point)
    first = (str(shorter.get("message") or "").splitlines() or [""])[0][:300]
    row = executor.new_row(
        point,
        shorter["status"],
        f"not run: this method was infeasible at the shorter length "
        f"{shorter['seq_len']} ({shorter['status']}: {first})",
    )
    row["skipped"] = True
    return row
