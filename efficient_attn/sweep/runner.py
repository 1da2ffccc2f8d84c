"""Run a sweep: points measured one at a time in a long-lived worker process
(:mod:`efficient_attn.sweep.pool`), each row appended as it finishes.

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
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from efficient_attn.sweep import claims
from efficient_attn.sweep.harness import Executor, Outcome, Progress, run_points
from efficient_attn.sweep.pool import WORKER, WorkerPool, group_of
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
from efficient_attn.sweep.worker import base_row

__all__ = ["Outcome", "Progress", "run_sweep", "run_worker"]
#: One point per process: ``python -m efficient_attn.sweep.worker < point.json``.
ONE_POINT = (sys.executable, "-m", "efficient_attn.sweep.worker")


def run_worker(
    payload: dict[str, Any], timeout_s: float, command: Sequence[str] = ONE_POINT
) -> dict[str, Any]:
    """Run one point in a fresh process (it reads the whole of stdin); a crash, kill or
    timeout becomes a row. The process starts with ``payload["devices"]`` devices."""
    with WorkerPool(timeout_s, command, one_shot=True) as pool:
        return pool.execute(payload)


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
    """Run the (shard of the) sweep's points not yet in ``out_dir`` in a long-lived worker.

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
    # Points on one device count share a worker, and a method's points run together.
    first = {}
    for i, p in enumerate(payloads):
        first.setdefault(group_of(p), i)
        first.setdefault((group_of(p), p["method"]), i)
    payloads.sort(key=lambda p: (first[group_of(p)], first[(group_of(p), p["method"])]))
    pool = WorkerPool(sweep.timeout_s, command)
    executor = Executor(
        execute=pool.execute,
        new_row=base_row,
        describe=lambda row: row_summary(row).removeprefix("ok "),
        family=_family,
        timeout_s=sweep.timeout_s,
    )
    shard_text = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    listed = [{**p.identity(), "label": p.label} for p in sweep.points] if shard else None
    with pool:
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
            all_points=listed,
        )
    # Shards, and other processes on this directory, may still share the float64 references.
    if (shard is None or shard[1] == 1) and not claims.live_claims(out_dir):
        shutil.rmtree(out_dir / ".cache", ignore_errors=True)
    return outcome
