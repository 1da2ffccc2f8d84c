"""The decode study's worker side: build one decoding step, compile it and time it.

A KV-cache step (``dynamic_update_slice`` into donated ``[B, L, K, H]``
buffers, then ``ea.attention`` with ``causal=True``) or, for methods with a
recurrent form, one :func:`efficient_attn.linear_step` from the state after
L - 1 tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from efficient_attn.studies.base import Unsupported


def _normals(seed: int, dtype) -> Callable[..., Any]:
    """``normal(*shape)``: standard normal arrays of ``dtype`` from NumPy (no JAX compiles)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    return lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _kv_cache_step(method: str, options: dict, b, t, n, kh, h, dtype, seed) -> tuple:
    """(cache, inputs, step): ``step(cache, q, k_new, v_new, pos) -> (out, cache)``."""
    import jax

    import efficient_attn as ea

    normal = _normals(seed, dtype)
    cache = (normal(b, t, kh, h), normal(b, t, kh, h))
    q, k_new, v_new = normal(b, 1, n, h), normal(b, 1, kh, h), normal(b, 1, kh, h)
    arrays = ea.init_arrays(method, jax.random.PRNGKey(seed), h, dtype=dtype)

    def step(cache, q, k_new, v_new, pos):
        k_cache, v_cache = (
            jax.lax.dynamic_update_slice(c, x, (0, pos, 0, 0))
            for c, x in zip(cache, (k_new, v_new), strict=True)
        )  # [B, L, K, H]
        out = ea.attention(q, k_cache, v_cache, method=method, causal=True, **options, **arrays)
        return out, (k_cache, v_cache)

    return cache, (q, k_new, v_new, jax.numpy.int32(t - 1)), step


def _recurrent_step(method: str, options: dict, b, t, n, kh, h, dtype, seed) -> tuple:
    """(state after L - 1 tokens, inputs, step): ``step(state, q, k, v) -> (out, state)``."""
    import functools

    import jax
    import jax.numpy as jnp

    import efficient_attn as ea

    normal = _normals(seed, dtype)
    state = ea.linear_init_state(method, b, kh, h, h, dtype=dtype, **options)
    q0 = jnp.zeros((b, n, h), dtype)
    spec = ea.get_method(method)
    arrays = ea.init_arrays(method, jax.random.PRNGKey(seed), h, B=b, T=t, K=kh)
    fixed = {name: x for name, x in arrays.items() if not spec.arrays[name].per_token}
    tokens = {  # per-token inputs, [L, B, K, ...]: L - 1 for the context, the last for the step
        name: jnp.swapaxes(x, 0, 1) for name, x in arrays.items() if spec.arrays[name].per_token
    }

    @functools.partial(jax.jit, donate_argnums=0)
    def absorb(state, ks, vs, context):  # ks, vs: [L - 1, B, K, H]
        def body(s, xs):
            k_t, v_t, tok = xs
            return ea.linear_step(method, s, q0, k_t, v_t, **options, **fixed, **tok)[1], None

        return jax.lax.scan(body, state, (ks, vs, context))[0]

    if t > 1:
        context = {name: x[: t - 1] for name, x in tokens.items()}
        ks, vs = normal(t - 1, b, kh, h), normal(t - 1, b, kh, h)
        state = jax.block_until_ready(absorb(state, ks, vs, context))
    q, k_new, v_new = normal(b, n, h), normal(b, kh, h), normal(b, kh, h)
    last = {name: x[t - 1] for name, x in tokens.items()}

    def step(state, q, k_new, v_new, last):
        return ea.linear_step(method, state, q, k_new, v_new, **options, **fixed, **last)

    return state, (q, k_new, v_new, last), step


def _time_steps(exe, carry, inputs, repeats: int, warmup: int, budget_s: float) -> tuple:
    """(seconds per step, last output): the donated ``carry`` is threaded through the calls."""
    import jax

    first = 0.0
    for i in range(warmup):
        start = time.perf_counter()
        out, carry = jax.block_until_ready(exe(carry, *inputs))
        first = time.perf_counter() - start if i == 0 else first
    repeats = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out, carry = jax.block_until_ready(exe(carry, *inputs))
        times.append(time.perf_counter() - start)
    return times, out


def measure(payload: dict[str, Any], row: dict[str, Any]) -> None:
    """Time one decoding step of ``payload``'s point and record its cache size."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import efficient_attn as ea

    spec = ea.get_method(payload["method"])
    reason = spec.available()
    if reason is not None:
        raise Unsupported(f"method {spec.name!r} is not available here: {reason}")
    b, t, n, kh, h = (payload[x] for x in ("batch", "seq_len", "heads", "kv_heads", "head_dim"))
    recurrent = spec.recurrent is not None
    needed = ["causal", "cross"] + (["gqa"] if kh != n else [])
    missing = [f for f in needed if f not in spec.supports]
    if missing and not recurrent:
        raise Unsupported(
            f"method {spec.name!r} cannot decode: it lacks {missing} (a one-token query over "
            f"a cache of {kh} K/V heads needs {needed}); it supports {sorted(spec.supports)}"
        )
    options = spec.resolve_options(payload["options"])
    build = _recurrent_step if recurrent else _kv_cache_step
    carry, inputs, step = build(
        spec.name, options, b, t, n, kh, h, jnp.dtype(payload["dtype"]), payload["seed"]
    )
    leaves = jax.tree_util.tree_leaves_with_path(carry)
    row["resolved_options"] = options
    row["decode_form"] = "recurrent state" if recurrent else "kv cache"
    row["cache_bytes"] = int(sum(x.nbytes for _, x in leaves))
    row["cache_shapes"] = {jax.tree_util.keystr(p): list(x.shape) for p, x in leaves}
    start = time.perf_counter()
    exe = jax.jit(step, donate_argnums=0).lower(carry, *inputs).compile()
    row["compile_s"] = time.perf_counter() - start
    memory = exe.memory_analysis()
    row["temp_bytes"] = None if memory is None else int(memory.temp_size_in_bytes)
    run = payload["run"]
    times, out = _time_steps(
        exe, carry, inputs, run["repeats"], run["warmup"], run["timing_budget_s"]
    )
    if not bool(np.isfinite(np.asarray(out, np.float32)).all()):
        raise FloatingPointError("the decoded output contains NaN or Inf")
    times_ms = [s * 1e3 for s in times]
    row.update(
        repeats=len(times_ms),
        time_ms=statistics.median(times_ms),
        time_ms_min=min(times_ms),
        time_ms_max=max(times_ms),
        times_ms=times_ms,
    )
    row["cache_gb_per_s"] = row["cache_bytes"] / (row["time_ms"] * 1e-3) / 1e9
