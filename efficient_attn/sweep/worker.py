"""Measure one sweep point in a fresh process and print its row as JSON.

``python -m efficient_attn.sweep.worker < point.json`` reads a point
(:meth:`Point.identity` plus ``repeats``, ``warmup``,
``reference_max_elements`` and optionally ``timing_budget_s``,
``time_max_elements`` and ``cache_dir``) and prints one JSON row on its last
stdout line. Compilation is timed separately; the compiled call is warmed up,
then timed ``repeats`` times with ``block_until_ready`` (fewer when one call takes longer than
``timing_budget_s / repeats``; the row records how many). Where
``B * N * Tq * Tk`` exceeds a nonzero ``time_max_elements`` the point is only
compiled: memory is recorded, time and error are null (``time_note`` says why).
Memory is XLA's compiled temp + argument + output bytes, plus the device's
measured peak where it reports one. ``rel_error`` compares the output (and
for ``fwd+bwd`` the gradients) with float64 exact attention from
:mod:`efficient_attn.core.reference` where that reference is affordable.

A point with a ``strategy`` runs
:func:`efficient_attn.parallel.sequence_parallel_attention` on a mesh of its
first ``devices`` devices, inputs split along the sequence; the memory fields
are then one device's share of the compiled SPMD program. The process must
start with that many devices (the runner sets
``--xla_force_host_platform_device_count``: see :func:`device_env`).

Statuses: ``ok``; ``unsupported`` (method not registered, not available on
this platform, or lacking a feature the point needs); ``oom``; ``error``.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: Test hook: ``"METHOD:SIGNAL"`` makes the worker for METHOD kill itself with
#: SIGNAL (e.g. ``dense:SIGKILL``, as the kernel's OOM killer would).
CRASH_ENV = "EFFICIENT_ATTN_SWEEP_CRASH"

#: Measurement fields of a row; all None unless the point ran.
MEASUREMENTS: tuple[str, ...] = (
    "resolved_options",
    "time_ms",
    "time_ms_min",
    "time_ms_max",
    "time_ms_std",
    "times_ms",
    "compile_s",
    "flops",
    "flops_per_s",
    "memory_bytes",
    "memory_temp_bytes",
    "memory_argument_bytes",
    "memory_output_bytes",
    "compiled_peak_bytes",
    "peak_bytes",
    "host_peak_rss_bytes",
    "block_density",
    "block_mask_build_ms",
    "useful_flops_fwd",
    "executed_flops_fwd",
    "rel_error",
    "grad_rel_error",
    "grad_rel_errors",
    "rel_error_note",
    "time_note",
)
_OOM_PATTERN = re.compile(
    r"resource.?exhausted|out of memory|memoryerror|bad_alloc|cannot allocate memory|\boom\b",
    re.IGNORECASE,
)


def looks_like_oom(text: str) -> bool:
    """Whether an error message or a crashed worker's stderr reports exhausted memory."""
    return _OOM_PATTERN.search(text) is not None


_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def device_env(devices: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker for a point on ``devices`` devices.

    On CPU, XLA splits the host into ``devices`` devices (read when JAX starts).
    """
    env = dict(os.environ if environ is None else environ)
    if devices > 1:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_FLAG}={devices}"])
        env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """Commit of the source tree this package runs from (``+dirty`` with local changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        run = dict(cwd=root, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def environment(devices: bool = True) -> dict[str, Any]:
    """Versions, device, git commit and date; ``devices=False`` avoids starting a backend."""
    env: dict[str, Any] = {
        "jax": _package_version("jax"),
        "jaxlib": _package_version("jaxlib"),
        "flax": _package_version("flax"),
        "numpy": _package_version("numpy"),
        "python": platform.python_version(),
        "platform": None,
        "device_kind": None,
        "device_count": None,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        "date": utc_now(),
    }
    if devices:
        import jax

        d = jax.devices()[0]
        env.update(platform=d.platform, device_kind=d.device_kind, device_count=jax.device_count())
    return env


def base_row(point: dict[str, Any], status: str, message: str = "") -> dict[str, Any]:
    """A row for ``point`` with every measurement field present (None)."""
    identity = {k: point.get(k) for k in _IDENTITY}
    return {
        **identity,
        "repeats": point.get("repeats"),
        "status": status,
        "message": message,
        **dict.fromkeys(MEASUREMENTS),
        "worker_s": None,
        "skipped": False,
        "env": None,
    }


_IDENTITY = (
    "key",
    "method",
    "options",
    "seq_len",
    "batch",
    "heads",
    "kv_heads",
    "head_dim",
    "dtype",
    "causal",
    "pass",
    "seed",
    "devices",
    "strategy",
    "mods",
)


def _available_bytes(device: Any) -> tuple[int | None, str]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), device.platform
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "host (MemAvailable)"
    except (OSError, KeyError, ValueError):
        return None, ""


def _reference(point: dict[str, Any], arrays: dict[str, Any], grads: bool) -> dict[str, Any]:
    """Float64 reference output (and gradients), cached on disk under ``cache_dir``."""
    import numpy as np

    import efficient_attn as ea
    from efficient_attn import bench

    # A method with its own function (additive) has its own reference, cached per method;
    # softmax attention's is shared by every method at the same inputs.
    own = ea.get_method(point["method"]).reference is not None
    shared = ("key", "method", "options", "pass", "devices", "strategy")
    ident = {k: point.get(k) for k in _IDENTITY if k not in shared or (own and k == "method")}
    digest = hashlib.sha256(json.dumps([ident, grads], sort_keys=True).encode()).hexdigest()[:20]
    cache = point.get("cache_dir")
    path = Path(cache) / f"ref-{digest}{'-grads' if grads else ''}.npz" if cache else None
    for known in [path, path.with_name(f"ref-{digest}-grads.npz")] if path else []:
        try:
            with np.load(known) as f:
                return dict(f)
        except (OSError, ValueError):
            continue
    q, k, v = (np.asarray(arrays[n]) for n in "qkv")
    causal = bool(point["causal"])
    if point.get("mods", "none") != "none":
        ref = _mods_reference(point, arrays, grads)
    elif own:  # its float64 formula, forward only (no gradient formula to compare with)
        ref = {"out": bench.own_reference(point["method"], q, k, v, causal=causal)}
    else:
        ref = {"out": ea.numpy_reference(q, k, v, causal=causal)[0]}
        if grads:
            dout = np.asarray(arrays["dout"])
            dq, dk, dv = ea.numpy_reference_grads(q, k, v, dout, causal=causal)
            ref.update(dq=dq, dk=dk, dv=dv)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **ref)
        os.replace(tmp, path)
    return ref


def _mods_reference(point: dict[str, Any], arrays: dict[str, Any], grads: bool) -> dict[str, Any]:
    """Float64 output (and gradients) with the point's mods on the materialised matrix."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import efficient_attn as ea
    from efficient_attn.core.mods import from_spec

    t, n = point["seq_len"], point["heads"]
    mask_mod, score_mod = from_spec(point["mods"], t, t, n)
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(np.asarray(arrays[x]), jnp.float64) for x in "qkv")

        def f(q, k, v):
            return ea.attention(q, k, v, method="dense", causal=bool(point["causal"]),
                                mask_mod=mask_mod, score_mod=score_mod)  # fmt: skip

        out, vjp = jax.vjp(f, q, k, v)
        ref = {"out": np.asarray(out)}
        if grads:
            dq, dk, dv = vjp(jnp.asarray(np.asarray(arrays["dout"]), jnp.float64))
            ref.update(dq=np.asarray(dq), dk=np.asarray(dk), dv=np.asarray(dv))
    return ref


def _mods_fn(point: dict[str, Any], row: dict[str, Any], spec: Any) -> Any:
    """``fwd(q, k, v)`` with the point's mods and a block mask built once (timed, recorded)."""
    import efficient_attn as ea
    from efficient_attn import bench
    from efficient_attn.core import blockmask
    from efficient_attn.core.mods import from_spec

    b, t, n, h = (point[x] for x in ("batch", "seq_len", "heads", "head_dim"))
    mask_mod, score_mod = from_spec(point["mods"], t, t, n)
    options, causal = dict(point["options"]), bool(point["causal"])
    kw = {"mask_mod": mask_mod, "score_mod": score_mod}
    tiles = {k: row["resolved_options"].get(k) for k in ("block_q", "block_k")}
    if None not in tiles.values():  # a tiled method: its block mask, built once
        mask = mask_mod if mask_mod is not None else ea.mods.full_mask()
        if causal:
            mask = mask & ea.mods.causal_bottom_right(t, t)
        start = time.perf_counter()
        block = blockmask.build_inferred(mask, t, t, batch=b, heads=n, **tiles)
        row["block_mask_build_ms"] = (time.perf_counter() - start) * 1e3
        row["block_density"] = block.density
        pairs = (
            float(block.visible.sum()) * (b // block.tiles.shape[0]) * (n // block.tiles.shape[1])
        )
        computed = float((block.tiles != 0).any((0, 1)).sum()) * tiles["block_q"] * tiles["block_k"]
        row["useful_flops_fwd"] = 4.0 * h * pairs
        row["executed_flops_fwd"] = 4.0 * h * computed * b * n
        kw = {"block_mask": block, "score_mod": score_mod}
        options = {k: v for k, v in options.items() if k not in tiles}

    def fwd(q, k, v):
        return ea.attention(q, k, v, method=spec.name, causal=causal, **kw,
                            **bench.with_arrays(spec.name, h, options))  # fmt: skip

    return fwd


def _measure(point: dict[str, Any], row: dict[str, Any]) -> None:
    """Fill ``row`` for a point whose method exists and supports it."""
    import jax
    import numpy as np

    import efficient_attn as ea
    from efficient_attn import bench

    spec = ea.get_method(point["method"])
    row["resolved_options"] = spec.resolve_options(point["options"])
    b, t, n, kh, h = (point[x] for x in ("batch", "seq_len", "heads", "kv_heads", "head_dim"))
    causal, backward = bool(point["causal"]), point["pass"] == "fwd+bwd"
    seed = int(point["seed"])
    q, k, v = bench.random_inputs(b, t, t, n, kh, h, point["dtype"], seed=seed)
    dout = jax.random.normal(jax.random.PRNGKey(seed + 1), (b, t, n, h), q.dtype)
    if point.get("mods", "none") != "none":
        fwd = _mods_fn(point, row, spec)
    elif point.get("strategy") is None:
        fwd = bench.attention_fn(spec.name, causal=causal, backward=False, **point["options"])
    else:
        fwd, (q, k, v, dout) = _sequence_parallel(point, (q, k, v, dout))
    args: tuple[Any, ...] = (q, k, v)
    f = fwd
    if backward:
        args = (q, k, v, dout)

        def f(q, k, v, dout):
            out, vjp = jax.vjp(fwd, q, k, v)
            return (out, *vjp(dout))

    exe, row["compile_s"] = bench.compiled(f, *args)
    mem = exe.memory_analysis()
    if mem is not None:
        parts = {
            "memory_temp_bytes": int(mem.temp_size_in_bytes),
            "memory_argument_bytes": int(mem.argument_size_in_bytes),
            "memory_output_bytes": int(mem.output_size_in_bytes),
        }
        row.update(parts, memory_bytes=sum(parts.values()))
        row["compiled_peak_bytes"] = getattr(mem, "peak_memory_in_bytes", None)
        available, where = _available_bytes(jax.devices()[0])
        if available is not None and row["memory_bytes"] > available:
            raise MemoryError(
                f"out of memory: the compiled program needs {row['memory_bytes'] / 2**30:.2f} GiB "
                f"(temp + arguments + outputs), {where} has {available / 2**30:.2f} GiB free; "
                "not run"
            )
    elements = b * n * t * t
    time_limit = int(point.get("time_max_elements") or 0)
    if time_limit and elements > time_limit:
        row["repeats"] = 0
        row["time_note"] = (
            f"compiled only: B*N*Tq*Tk = {elements:,} elements, more than "
            f"time_max_elements = {time_limit:,}"
        )
        return
    start = time.perf_counter()
    result = jax.block_until_ready(exe(*args))  # first warm-up call; its output is checked
    first_s = time.perf_counter() - start
    repeats = int(point["repeats"])
    budget = point.get("timing_budget_s")
    if budget is not None:  # slow points: fewer repeats, so that timing takes about `budget`
        repeats = max(1, min(repeats, int(budget / max(first_s, 1e-9))))
    row["repeats"] = repeats
    times = bench.time_compiled(exe, args, repeats, int(point["warmup"]) - 1)
    times_ms = [s * 1e3 for s in times]
    row.update(
        time_ms=statistics.median(times_ms),
        time_ms_min=min(times_ms),
        time_ms_max=max(times_ms),
        time_ms_std=statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0,
        times_ms=times_ms,
    )
    row["flops"] = bench.attention_flops(b, n, t, t, h, causal=causal, backward=backward)
    if row.get("useful_flops_fwd") is not None:  # mods: FLOPs of the visible pairs only
        row["flops"] = row["useful_flops_fwd"] * (3.5 if backward else 1.0)
    row["flops_per_s"] = row["flops"] / (row["time_ms"] / 1e3)
    stats = jax.devices()[0].memory_stats()
    row["peak_bytes"] = None if not stats else stats.get("peak_bytes_in_use")
    row["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outs = result if backward else (result,)
    if not all(bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in outs):
        raise FloatingPointError("the output or its gradients contain NaN or Inf")
    if elements > int(point["reference_max_elements"]):
        row["rel_error_note"] = (
            f"not computed: the float64 reference needs B*N*Tq*Tk = {elements:,} elements, "
            f"more than reference_max_elements = {int(point['reference_max_elements']):,}"
        )
        return
    arrays = {"q": q, "k": k, "v": v, "dout": args[3] if backward else None}
    ref = _reference(point, arrays, grads=backward)
    row["rel_error"] = bench.relative_error(outs[0], ref["out"])
    if spec.reference is not None:
        row["rel_error_note"] = "against the method's own float64 formula, not softmax attention"
    if backward and "dq" not in ref:
        row["rel_error_note"] += "; gradients not compared (no float64 gradient formula)"
    elif backward:
        names = ("dq", "dk", "dv")
        errs = {g: bench.relative_error(x, ref[g]) for g, x in zip(names, outs[1:], strict=True)}
        row["grad_rel_errors"] = errs
        row["grad_rel_error"] = max(errs.values())


class _Unsupported(Exception):
    """The point's configuration is rejected by the library (a ValueError naming the rule)."""


def _sequence_parallel(point: dict[str, Any], arrays: tuple[Any, ...]) -> tuple[Any, tuple]:
    """``fwd(q, k, v)`` split over ``point["devices"]`` devices, and the arrays placed on them."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from efficient_attn.parallel import sequence_parallel_attention

    devices = int(point["devices"])
    if jax.device_count() < devices:
        raise RuntimeError(
            f"devices={devices} but this process has {jax.device_count()} "
            f"(start it with XLA_FLAGS={_DEVICE_FLAG}={devices} on CPU)"
        )
    mesh = Mesh(jax.devices()[:devices], ("sp",))
    options, strategy = dict(point["options"]), point["strategy"]

    def fwd(q, k, v):
        return sequence_parallel_attention(
            q, k, v, mesh=mesh, axis="sp", strategy=strategy, method=point["method"],
            causal=bool(point["causal"]), **options,
        )  # fmt: skip

    split = PartitionSpec(None, "sp") if point["seq_len"] % devices == 0 else PartitionSpec()
    arrays = tuple(jax.device_put(x, NamedSharding(mesh, split)) for x in arrays)
    try:
        jax.eval_shape(fwd, *arrays[:3])
    except ValueError as e:
        raise _Unsupported(f"{strategy} on {devices} devices: {e}") from e
    return fwd, arrays


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
            _measure(point, row)
    except _Unsupported as e:
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


def main() -> int:
    point = json.loads(sys.stdin.read())
    row = run_point(point)
    sys.stdout.write("\n" + json.dumps(row) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
