"""Measure sweep points in a worker process and print their rows as JSON.

``python -m efficient_attn.sweep.worker --serve`` reads points, one JSON line
each, from stdin and writes each row as one JSON line to stdout as soon as it
is measured (anything else the point prints goes to stderr); it resets the
process's peak resident memory before each point, and exits after a point on a
device that reports its own peak memory (``memory_stats``), so that no row's
memory includes another point's; when the method changes it also drops JAX's
caches of compiled programs and hands freed heap back to the system.
:class:`efficient_attn.sweep.pool.WorkerPool` runs one such process per device
count. ``python -m efficient_attn.sweep.worker < point.json`` measures one point. A point is
(:meth:`Point.identity` plus ``repeats``, ``warmup``,
``reference_max_elements`` and optionally ``timing_budget_s``,
``time_max_elements`` and ``cache_dir``) and prints one JSON row on its last
stdout line. This module is the process's entry point: it checks that the
method supports the point, then :func:`efficient_attn.sweep.measure.measure_point`
fills the row (compile time, time over ``repeats``, memory, error against a
float64 reference; the module says how). The row's fields and provenance are
:mod:`efficient_attn.sweep.protocol`'s (re-exported here).

A point with a ``strategy`` runs on a mesh of its first ``devices`` devices:
the process must start with that many devices (the runner sets
``--xla_force_host_platform_device_count``: see :func:`device_env`).

Statuses: ``ok``; ``unsupported`` (method not registered, not available on
this platform, or lacking a feature the point needs); ``oom``; ``error``.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from typing import Any

from efficient_attn.sweep.measure import Unsupported, measure_point
from efficient_attn.sweep.protocol import (  # noqa: F401  (re-exported: the row protocol)
    MEASUREMENTS,
    base_row,
    device_env,
    environment,
    git_commit,
    looks_like_oom,
    utc_now,
)

#: Test hook: ``"METHOD:SIGNAL"`` makes the worker for METHOD kill itself with
#: SIGNAL (e.g. ``dense:SIGKILL``, as the kernel's OOM killer would).
CRASH_ENV = "EFFICIENT_ATTN_SWEEP_CRASH"


def _mod_features(point: dict[str, Any]) -> list[tuple[str, bool]]:
    """The mod features a point's ``mods`` variant needs."""
    if point.get("mods", "none") == "none":
        return []
    from efficient_attn.core.mods import from_spec

    mask_mod, score_mod = from_spec(point["mods"], point["seq_len"], point["seq_len"], 1)
    return [("mask_mod", mask_mod is not None), ("score_mod", score_mod is not None)]


def _unsupported_reason(point: dict[str, Any]) -> str | None:
    import efficient_attn as ea

    if point["method"] not in ea.methods():
        valid = ", ".join(ea.methods())
        return f"method {point['method']!r} is not registered; registered: {valid}"
    spec = ea.get_method(point["method"])
    reason = spec.available()
    if reason is not None:
        return f"method {spec.name!r} is not available here: {reason}"
    needed = [
        feature
        for feature, used in (
            ("causal", point["causal"]),
            ("gqa", point["kv_heads"] != point["heads"]),
            ("grad", point["pass"] == "fwd+bwd"),
            *_mod_features(point),
        )
        if used
    ]
    missing = [f for f in needed if f not in spec.supports]
    if missing:
        valid = sorted(spec.supports)
        return f"method {spec.name!r} does not support {missing}; it supports {valid}"
    if spec.causal_only and not point["causal"]:
        return f"method {spec.name!r} is a causal recurrence: it needs causal=True"
    return None


def run_point(point: dict[str, Any]) -> dict[str, Any]:
    """Measure ``point`` and return its row; failures become rows, never exceptions."""
    start = time.perf_counter()
    crash = os.environ.get(CRASH_ENV, "")
    if crash.partition(":")[0] == point.get("method"):
        os.kill(os.getpid(), getattr(signal, crash.partition(":")[2] or "SIGKILL"))
    row = base_row(point, "ok")
    try:
        row["env"] = environment()
        reason = _unsupported_reason(point)
        if reason is not None:
            row.update(status="unsupported", message=reason)
        else:
            measure_point(point, row)
    except Unsupported as e:
        row.update(status="unsupported", message=str(e)[:2000])
        for field in MEASUREMENTS[1:]:
            row[field] = None
    except Exception as e:
        text = f"{type(e).__name__}: {e}".strip()
        row.update(status="oom" if looks_like_oom(text) else "error", message=text[:2000])
        if row["status"] == "error" and not isinstance(e, FloatingPointError):
            for field in MEASUREMENTS[1:]:
                row[field] = None
    row["worker_s"] = time.perf_counter() - start
    return row


def _device_reports_peak() -> bool:
    """Whether the device keeps a process-wide peak (``peak_bytes_in_use``) that a later
    point in this process would inherit (accelerators; a CPU reports none)."""
    if "jax" not in sys.modules:
        return False
    import jax

    stats = jax.devices()[0].memory_stats()
    return bool(stats) and "peak_bytes_in_use" in stats


def _release_memory(clear_caches: bool) -> None:
    """Free what earlier points left: their arrays, optionally JAX's compiled-program caches,
    and the heap pages glibc keeps after a free (``malloc_trim``), so the next point's
    peak resident memory starts near the process's baseline."""
    gc.collect()
    if clear_caches and "jax" in sys.modules:
        import jax

        jax.clear_caches()
        gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def serve() -> int:
    """Measure points read line by line from stdin; one row line each on stdout."""
    rows = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints (JAX, methods) go to stderr, never between rows
    method = None
    for line in sys.stdin:
        if not line.strip():
            continue
        point = json.loads(line)
        _release_memory(clear_caches=point.get("method") != method)
        method = point.get("method")
        row = run_point(point)
        last = _device_reports_peak()
        rows.write(json.dumps({**row, "worker_exit": True} if last else row) + "\n")
        rows.flush()
        if last:
            break
    return 0


def main() -> int:
    if sys.argv[1:] == ["--serve"]:
        return serve()
    point = json.loads(sys.stdin.read())
    row = run_point(point)
    sys.stdout.write("\n" + json.dumps(row) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
