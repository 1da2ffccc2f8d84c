"""Run a sweep: one fresh worker process per point, each row appended as it finishes.

The loop is :func:`efficient_attn.sweep.harness.run_points` (shared with studies
and the quality grid). Rows go to ``DIR/results.jsonl`` (``DIR/results.shard-I-of-N.jsonl`` for a
shard, so that array jobs on a shared file system never write one file
together). A row is written with one ``write`` and an ``fsync``. Re-running
resumes: points whose key is in any ``DIR/results*.jsonl`` are skipped. Several
sweeps may run on one directory at once: each point is claimed first, and one
that another live process holds is left to it (:mod:`efficient_attn.sweep.claims`).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from efficient_attn.sweep import claims
from efficient_attn.sweep.harness import Executor, Outcome, Progress, run_points
from efficient_attn.sweep.results import (  # noqa: F401  (re-exported: the store)
    RESULTS,
    append_row,
    infeasible,
    merge_rows,
    read_rows,
    results_files,
    results_name,
)
from efficient_attn.sweep.spec import Point, Sweep
from efficient_attn.sweep.worker import base_row, device_env, looks_like_oom

__all__ = ["Outcome", "Progress", "run_sweep", "run_worker"]
WORKER = (sys.executable, "-m", "efficient_attn.sweep.worker")


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


def _meta(sweep: Sweep, extra: dict[str, Any]) -> dict[str, Any]:
    return {
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


def _family(d: dict[str, Any]) -> str:
    """The point's key without its length: a method on one configuration."""
    return dataclasses.replace(Point.from_identity(d), seq_len=0).key


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
    points = sweep.shard(*shard) if shard else sweep.points
    payloads = [
        {
            **p.identity(),
            "label": p.label,
            "repeats": sweep.repeats,
            "warmup": sweep.warmup,
            "reference_max_elements": sweep.reference_max_elements,
            "timing_budget_s": sweep.timing_budget_s,
            "time_max_elements": sweep.time_max_elements,
            "cache_dir": str(out_dir / ".cache"),
        }
        for p in points
    ]
    executor = Executor(
        execute=lambda payload: run_worker(payload, sweep.timeout_s, command),
        new_row=base_row,
        describe=lambda row: row_summary(row).removeprefix("ok "),
        family=_family,
        timeout_s=sweep.timeout_s,
    )
    shard_text = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    outcome = run_points(
        payloads,
        out_dir,
        executor,
        name=f"sweep {sweep.name!r}{shard_text}",
        results_file=results_name(shard),
        retry_errors=retry_errors,
        skip_infeasible=skip_infeasible,
        stream=stream,
        meta=_meta(sweep, meta or {}),
        all_points=[{**p.identity(), "label": p.label} for p in sweep.points] if shard else None,
    )
    # Shards, and other processes on this directory, may still share the float64 references.
    if (shard is None or shard[1] == 1) and not claims.live_claims(out_dir):
        shutil.rmtree(out_dir / ".cache", ignore_errors=True)
    return outcome
