"""Measurement helpers: timing done right, compiled memory, analytic FLOPs.

Compile is separated from running; every timing warms up, blocks on the
result, repeats, and reports the median and spread. Inputs are fresh random
normals (never zeros).
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core.api import attention
from efficient_attn.core.registry import get_method, init_arrays


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    compile_s: float
    temp_bytes: int | None  # compiled temporary memory


def random_inputs(
    batch: int,
    q_len: int,
    kv_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: Any = jnp.float32,
    seed: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random normal q [B,Tq,N,H], k [B,Tk,K,H], v [B,Tk,K,H] (drawn on the host: see
    :func:`random_normal`)."""
    rng = np.random.default_rng(seed)
    return tuple(
        random_normal((batch, length, h, head_dim), dtype, rng)
        for length, h in ((q_len, heads), (kv_len, kv_heads), (kv_len, kv_heads))
    )


def random_normal(shape: tuple[int, ...], dtype: Any, seed: int | np.random.Generator) -> jax.Array:
    """Standard normal values drawn with NumPy and placed on the device in ``dtype``.

    Host-side, so making inputs compiles no XLA program (``jax.random`` compiles one per
    shape, about half a second on a CPU: more than many measured points take).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32).astype(jnp.dtype(dtype))
    return jax.device_put(x)


def with_arrays(
    method: str, head_dim: int, options: dict[str, Any], seed: int = 0, **dims: int
) -> dict:
    """``options`` plus the array options ``method`` requires and ``options`` lacks.

    Missing arrays are initialised from ``PRNGKey(seed)`` by the method's
    initialisers (concrete even when called while tracing), so benchmarks
    and sweeps run methods with learned arrays (``additive``) or per-token
    inputs (``gla``: ``dims`` gives their ``B``, ``T``, ``K``) with no special case.
    """
    if all(name in options for name in get_method(method).arrays):
        return options
    with jax.ensure_compile_time_eval():
        made = init_arrays(method, jax.random.PRNGKey(seed), head_dim, **dims)
    return {**made, **options}


def input_dims(q: Any, k: Any) -> dict[str, int]:
    """``B``, ``T``, ``K`` of ``q [B, Tq, N, H]``, ``k [B, Tk, K, H]`` (for per-token arrays)."""
    return {"B": q.shape[0], "T": k.shape[1], "K": k.shape[2]}


def own_reference(method: str, q: Any, k: Any, v: Any, *, causal: bool, **options: Any):
    """Float64 output of the method's own formula (``Method.reference``), or None.

    For methods that define their own function (``additive``) rather than
    approximating softmax attention; arrays as in :func:`with_arrays`.
    """
    spec = get_method(method)
    if spec.reference is None:
        return None
    given = with_arrays(method, q.shape[-1], options, **input_dims(q, k))
    arrays = {name: np.asarray(given[name]) for name in spec.arrays}  # the formula's only options
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    return spec.reference(q, k, v, causal=causal, scale=spec.default_scale(q.shape[-1]), **arrays)


def attention_fn(method: str, *, causal: bool, backward: bool, **options: Any) -> Callable:
    """``f(q, k, v)``: forward output, or (dq, dk, dv) of ``sum(out * dout)`` when ``backward``.

    Array options the method requires and ``options`` lacks come from :func:`with_arrays`.
    """

    def fwd(q, k, v):
        opts = with_arrays(method, q.shape[-1], options, **input_dims(q, k))
        return attention(q, k, v, method=method, causal=causal, **opts)

    if not backward:
        return fwd

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(fwd, q, k, v)
        dout = jax.random.normal(jax.random.PRNGKey(1), out.shape, out.dtype)
        return vjp(dout)

    return fwd_bwd


def compiled(f: Callable, *args: Any) -> tuple[Any, float]:
    """(compiled executable, compile seconds) of ``jax.jit(f)`` for ``args``."""
    start = time.perf_counter()
    exe = jax.jit(f).lower(*args).compile()
    return exe, time.perf_counter() - start


def temp_bytes(exe: Any) -> int | None:
    """Compiled temporary memory, or None where the backend does not report it."""
    analysis = exe.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def time_compiled(exe: Any, args: Sequence[Any], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds per call of a compiled executable (after ``warmup`` calls)."""
    for _ in range(warmup):
        jax.block_until_ready(exe(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(exe(*args))
        times.append(time.perf_counter() - start)
    return times


def interleaved_ratios(pairs: Sequence[Any], repeats: int) -> dict[str, tuple[float, float, float]]:
    """``name -> (median ratio a/b, median t_a, median t_b)`` of ``(name, (exe_a, args_a), (exe_b,
    args_b))`` pairs, timed in interleaved rounds (one call of each side per round, after a
    warm-up round), so load from other processes affects both sides of a ratio alike."""
    for _, a, b in pairs:  # warm-up round
        jax.block_until_ready(a[0](*a[1]))
        jax.block_until_ready(b[0](*b[1]))
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in pairs}
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _, _ in pairs}
    for _ in range(repeats):
        for name, a, b in pairs:
            ta = min(time_compiled(a[0], a[1], repeats=1, warmup=0))
            tb = min(time_compiled(b[0], b[1], repeats=1, warmup=0))
            ratios[name].append(ta / tb)
            times[name][0].append(ta)
            times[name][1].append(tb)
    return {
        name: (statistics.median(r), statistics.median(times[name][0]),
               statistics.median(times[name][1]))
        for name, r in ratios.items()
    }  # fmt: skip


def write_report(lines: Sequence[str], path: str) -> None:
    """Print a benchmark's markdown ``lines`` and write them to ``path`` (folders made)."""
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def measure(f: Callable, args: Sequence[Any], repeats: int = 5, warmup: int = 1) -> Timing:
    """Compile ``f`` for ``args``, then time it; see :class:`Timing`."""
    exe, compile_s = compiled(f, *args)
    times = time_compiled(exe, args, repeats, warmup)
    return Timing(
        median_s=statistics.median(times),
        min_s=min(times),
        max_s=max(times),
        compile_s=compile_s,
        temp_bytes=temp_bytes(exe),
    )


def attention_flops(
    batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, *, causal: bool, backward: bool
) -> float:
    """Analytic FLOPs: forward 4*B*N*Tq*Tk*H (halved for causal self-attention), x3.5 fwd+bwd."""
    flops = 4.0 * batch * heads * q_len * kv_len * head_dim
    if causal:
        flops /= 2
    return flops * (3.5 if backward else 1.0)


def matmul_flop_rate(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 5) -> float:
    """Measured FLOP/s of an ``n x n x n`` matmul: the machine's dense ceiling."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    t = measure(jnp.matmul, (a, b), repeats=repeats)
    return 2.0 * n**3 / t.median_s


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')} x{jax.device_count()}"


def relative_error(x: Any, ref: Any) -> float:
    """Relative Frobenius error ``|x - ref| / |ref|`` in float64."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))
