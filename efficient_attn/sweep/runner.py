"""Run a sweep: one fresh worker process per point, each row appended as it finishes.

Rows go to ``DIR/results.jsonl`` (``DIR/results.shard-I-of-N.jsonl`` for a
shard, so that array jobs on a shared file system never write one file
together). A row is written with one ``write`` and an ``fsync``. Re-running
resumes: points whose key is in any ``DIR/results*.jsonl`` are skipped.
Unparsable lines (a row torn by a kill) are ignored, and a new row never
continues a torn line. Float64 references are cached in ``DIR/.cache`` while
the sweep runs (every method at a shape shares one) and removed at its end.
A worker that crashes, is killed or times out still becomes a row, and the
sweep goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from efficient_attn.sweep.spec import Point, Sweep
from efficient_attn.sweep.worker import (
    base_row,
    device_env,
    environment,
    looks_like_oom,
    utc_now,
)

RESULTS = "results.jsonl"
WORKER = (sys.executable, "-m", "efficient_attn.sweep.worker")


def results_name(shard: tuple[int, int] | None) -> str:
    if shard is None or shard[1] == 1:
        return RESULTS
    return f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"


def results_files(path: str | Path) -> list[Path]:
    """``path`` itself if a file, else the ``results*.jsonl`` files in the directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.glob("results*.jsonl")) if path.is_dir() else []


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of one JSONL file; unparsable lines (torn by a kill) are skipped."""
    rows = []
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return rows
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict) and "key" in row and "status" in row:
            rows.append(row)
    return rows


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one line with a single ``write``, then ``fsync``."""
    data = (json.dumps(row, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # the last line was torn: never glue a row onto it
        written = os.write(fd, data)
        while written < len(data):  # regular files write fully; be safe anyway
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _row_from_output(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "status" in row:
                return row
    return None


def run_worker(
    payload: dict[str, Any], timeout_s: float, command: Sequence[str] = WORKER
) -> dict[str, Any]:
    """Run one point in a fresh process; a crash, kill or timeout becomes a row.

    The process starts with ``payload["devices"]`` devices (:func:`device_env`).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(command),
        env=device_env(int(payload.get("devices") or 1)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C reaches the runner, which then stops the worker
    )
    try:
        stdout, stderr = proc.communicate(json.dumps(payload), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        row = base_row(payload, "error", f"timeout: killed after {timeout_s:g} s")
        row["worker_s"] = time.perf_counter() - start
        return row
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    row = _row_from_output(stdout)
    if row is not None:
        return row
    tail = stderr.strip()[-1500:]
    rc = proc.returncode
    if rc < 0 and -rc == signal.SIGKILL:
        status = "oom"
        message = "worker killed by SIGKILL (the kernel's out-of-memory killer is the usual cause)"
    else:
        how = f"killed by {_signal_name(-rc)}" if rc < 0 else f"exited with status {rc}"
        status = "oom" if looks_like_oom(tail) else "error"
        message = f"worker {how} without a result"
    row = base_row(payload, status, message + (f"; stderr: {tail}" if tail else ""))
    row["worker_s"] = time.perf_counter() - start
    return row


def _fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def row_summary(row: dict[str, Any]) -> str:
    """A few words on a finished row for the progress log."""
    if row["status"] != "ok":
        return f"{row['status']}: {str(row.get('message', ''))[:100]}"
    parts = ["compiled only" if row["time_ms"] is None else f"{row['time_ms']:.3g} ms"]
    if row.get("memory_bytes") is not None:
        parts.append(f"{row['memory_bytes'] / 2**20:.3g} MiB")
    if row.get("rel_error") is not None:
        parts.append(f"err {row['rel_error']:.1e}")
    return "ok " + ", ".join(parts)


class Progress:
    """Progress bar on ``stream`` with the current point and an ETA.

    On a terminal the bar is redrawn in place; elsewhere (batch logs) one line
    is written per finished point.
    """

    def __init__(self, points: Sequence[Point], stream: TextIO | None, width: int = 24):
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
            mean.get(p.seq_len, fixed + work * p.seq_len / longest) for p in self.points[done:]
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

    def started(self, index: int, point: Point) -> None:
        if self.tty:
            self.stream.write(f"\r\033[K{self._bar(index)} | {point.label}")
            self.stream.flush()

    def finished(self, index: int, point: Point, row: dict[str, Any], seconds: float) -> None:
        self.seconds.setdefault(point.seq_len, []).append(seconds)
        if self.stream is None:
            return
        line = f"{point.label}: {row_summary(row)} ({seconds:.1f} s)"
        if self.tty:
            self.stream.write(f"\r\033[K  {line}\n{self._bar(index + 1)}")
        else:
            self.stream.write(f"{self._bar(index + 1)} | {line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclasses.dataclass
class Outcome:
    """What one :func:`run_sweep` call did."""

    path: Path
    ran: int
    skipped: int
    statuses: Counter


def _write_meta(out_dir: Path, sweep: Sweep, extra: dict[str, Any]) -> None:
    meta = {
        **extra,
        "name": sweep.name,
        "description": sweep.description,
        "note": sweep.note,
        "points": len(sweep.points),
        "repeats": sweep.repeats,
        "warmup": sweep.warmup,
        "timeout_s": sweep.timeout_s,
        "timing_budget_s": sweep.timing_budget_s,
        "reference_max_elements": sweep.reference_max_elements,
        "time_max_elements": sweep.time_max_elements,
    }
    tmp = out_dir / f".sweep.json.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out_dir / "sweep.json")


def _family(point: Point) -> str:
    """The point's key without its length: a method on one configuration."""
    return dataclasses.replace(point, seq_len=0).key


def infeasible(row: dict[str, Any]) -> bool:
    """Out of memory or out of time: a longer sequence of the same family would be too."""
    return row["status"] == "oom" or str(row.get("message", "")).startswith("timeout")


def _done(out_dir: Path, retry_errors: bool) -> tuple[set[str], dict[str, dict[str, Any]]]:
    """(finished keys, family -> shortest infeasible row) from the rows already written."""
    latest: dict[str, dict[str, Any]] = {}
    for path in results_files(out_dir):
        for row in read_rows(path):
            latest[row["key"]] = row
    done = {k for k, r in latest.items() if not (retry_errors and r["status"] == "error")}
    failed: dict[str, dict[str, Any]] = {}
    for row in latest.values():
        if infeasible(row) and not row.get("skipped"):
            family = _family(Point.from_identity(row))
            if family not in failed or row["seq_len"] < failed[family]["seq_len"]:
                failed[family] = row
    return done, failed


def _skipped_row(payload: dict[str, Any], failed: dict[str, Any]) -> dict[str, Any]:
    first = (str(failed.get("message") or "").splitlines() or [""])[0][:300]
    row = base_row(
        payload,
        failed["status"],
        f"not run: this method was infeasible at the shorter length {failed['seq_len']} "
        f"({failed['status']}: {first})",
    )
    row["skipped"] = True
    return row


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path,
    *,
    shard: tuple[int, int] | None = None,
    retry_errors: bool = False,
    skip_infeasible: bool = True,
    stream: TextIO | None = sys.stderr,
    command: Sequence[str] = WORKER,
    meta: dict[str, Any] | None = None,
) -> Outcome:
    """Run the (shard of the) sweep's points not yet in ``out_dir``, one worker each.

    ``retry_errors`` also re-runs points whose latest row is an ``error``
    (the new row supersedes it in reports). With ``skip_infeasible``, a point
    whose method ran out of memory or time at a shorter length (same
    configuration otherwise) is recorded with that status without running.
    ``meta`` is stored in ``DIR/sweep.json`` (e.g. the command line).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = sweep.shard(*shard) if shard else sweep.points
    done, failed = _done(out_dir, retry_errors)
    todo = [p for p in points if p.key not in done]
    path = out_dir / results_name(shard)
    _write_meta(out_dir, sweep, meta or {})
    progress = Progress(todo, stream)
    if stream is not None:
        shard_text = f" (shard {shard[0]}/{shard[1]})" if shard else ""
        stream.write(
            f"sweep {sweep.name!r}{shard_text}: {len(points)} points, "
            f"{len(points) - len(todo)} already in {out_dir}, running {len(todo)} -> {path}\n"
        )
    fallback_env = environment(devices=False)
    statuses: Counter = Counter()
    for i, point in enumerate(todo):
        payload = {
            **point.identity(),
            "repeats": sweep.repeats,
            "warmup": sweep.warmup,
            "reference_max_elements": sweep.reference_max_elements,
            "timing_budget_s": sweep.timing_budget_s,
            "time_max_elements": sweep.time_max_elements,
            "cache_dir": str(out_dir / ".cache"),
        }
        progress.started(i, point)
        start = time.perf_counter()
        family = _family(point)
        if skip_infeasible and family in failed and failed[family]["seq_len"] < point.seq_len:
            row = _skipped_row(payload, failed[family])
        else:
            row = run_worker(payload, sweep.timeout_s, command)
            if infeasible(row) and family not in failed:
                failed[family] = row
        if row.get("env"):
            fallback_env = row["env"]
        else:
            row["env"] = {**fallback_env, "date": utc_now()}
        append_row(path, row)
        statuses[row["status"]] += 1
        progress.finished(i, point, row, time.perf_counter() - start)
    progress.close()
    if shard is None or shard[1] == 1:  # shards may still share the float64 references
        shutil.rmtree(out_dir / ".cache", ignore_errors=True)
    return Outcome(path=path, ran=len(todo), skipped=len(points) - len(todo), statuses=statuses)


def merge_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Rows of every results file under ``paths``; a later row with the same key wins."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        files = results_files(path)
        if not files:
            raise ValueError(f"no results*.jsonl at {path}")
        for f in files:
            for row in read_rows(f):
                merged.pop(row["key"], None)
                merged[row["key"]] = row
    return list(merged.values())
