"""The measurements of one sweep point, made inside its worker process.

Compilation is timed separately; the compiled call is warmed up, then timed
``repeats`` times with ``block_until_ready`` (fewer when one call takes longer
than ``timing_budget_s / repeats``; the row records how many). Where
``B * N * Tq * Tk`` exceeds a nonzero ``time_max_elements`` the point is only
compiled: memory is recorded, time and error are null (``time_note`` says why).
Memory is XLA's compiled temp + argument + output bytes, plus the device's
measured peak where it reports one, and on the host the worker's peak resident
memory during the point (``host_peak_rss_bytes``: the process's, so it includes
the interpreter, JAX and what earlier points in the worker retained) and its
increase over the point's start (``host_rss_increase_bytes``: the point's own).
``rel_error`` compares the output (and for ``fwd+bwd`` the gradients) with
float64 exact attention from :mod:`efficient_attn.core.reference` where that reference is affordable
(cached on disk under ``cache_dir``).

A point with ``mods`` runs with its mask and score mods (a tiled method gets
its block mask built once, timed, with its density and useful/executed FLOPs).
A point with a ``strategy`` runs
:func:`efficient_attn.parallel.sequence_parallel_attention` on a mesh of its
first ``devices`` devices, inputs split along the sequence; the memory fields
are then one device's share of the compiled SPMD program.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from efficient_attn.sweep.protocol import DEVICE_FLAG, IDENTITY


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


def reset_peak_rss() -> None:
    """Start the process's peak resident memory afresh (Linux ``clear_refs``; else a no-op),
    so a worker that measured earlier points reports this point's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory since :func:`reset_peak_rss` (``VmHWM``), else since start."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int | None:
    """Resident memory now (``VmRSS``; None where /proc is missing)."""
    return _status_bytes("VmRSS")


def _reference(point: dict[str, Any], arrays: dict[str, Any], grads: bool) -> dict[str, Any]:
    """Float64 reference output (and gradients), cached on disk under ``cache_dir``."""
    import numpy as np

    import efficient_attn as ea
    from efficient_attn import bench

    # A method with its own function (additive) has its own reference, cached per method;
    # softmax attention's is shared by every method at the same inputs.
    own = ea.get_method(point["method"]).reference is not None
    shared = ("key", "method", "options", "pass", "devices", "strategy")
    ident = {k: point.get(k) for k in IDENTITY if k not in shared or (own and k == "method")}
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
    from efficient_attn.core.engine.tiling import default_tiles
    from efficient_attn.core.mods import from_spec

    b, t, n, h = (point[x] for x in ("batch", "seq_len", "heads", "head_dim"))
    mask_mod, score_mod = from_spec(point["mods"], t, t, n)
    options, causal = dict(point["options"]), bool(point["causal"])
    kw = {"mask_mod": mask_mod, "score_mod": score_mod}
    opts = row["resolved_options"]
    tiles = {}
    if "block_q" in opts and "block_k" in opts:  # a tiled method (None: the engine's tiles)
        default = dict(zip(("block_q", "block_k"), default_tiles(t, t), strict=True))
        tiles = {k: default[k] if opts[k] is None else opts[k] for k in default}
    if tiles:  # its block mask, built once
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


def measure_point(point: dict[str, Any], row: dict[str, Any]) -> None:
    """Fill ``row`` for a point whose method exists and supports it."""
    import jax
    import numpy as np

    import efficient_attn as ea
    from efficient_attn import bench

    reset_peak_rss()
    rss_at_start = rss_bytes()
    spec = ea.get_method(point["method"])
    row["resolved_options"] = spec.resolve_options(point["options"])
    b, t, n, kh, h = (point[x] for x in ("batch", "seq_len", "heads", "kv_heads", "head_dim"))
    causal, backward = bool(point["causal"]), point["pass"] == "fwd+bwd"
    seed = int(point["seed"])
    q, k, v = bench.random_inputs(b, t, t, n, kh, h, point["dtype"], seed=seed)
    dout = bench.random_normal((b, t, n, h), q.dtype, seed + 1)
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
    row["host_peak_rss_bytes"] = peak_rss_bytes()
    if rss_at_start is not None:  # this point's own: not the interpreter, JAX or earlier points
        row["host_rss_increase_bytes"] = row["host_peak_rss_bytes"] - rss_at_start
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


class Unsupported(Exception):
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
            f"(start it with XLA_FLAGS={DEVICE_FLAG}={devices} on CPU)"
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
        raise Unsupported(f"{strategy} on {devices} devices: {e}") from e
    return fwd, arrays
