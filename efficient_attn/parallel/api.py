"""``sequence_parallel_attention``: attention with the sequence split over a mesh axis."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from efficient_attn.core import masking
from efficient_attn.core.api import prepare
from efficient_attn.parallel.all_to_all import all_to_all_attention
from efficient_attn.parallel.kernels import RingKernel
from efficient_attn.parallel.ring import ring_attention


def _ring(q, k, v, kv_lengths, scale, *, mesh, axis, causal, method, options, mods):
    if mods.get("block_mask") is not None:
        raise ValueError(
            "strategy='ring' builds a block mask per pair of shards; pass mask_mod= instead of "
            "block_mask="
        )
    kernel = RingKernel.resolve(method, options)
    kv_len = masking.full_kv_lengths(kv_lengths, q.shape[0], k.shape[1])
    return ring_attention(
        q, k, v, kv_len, scale, mesh=mesh, axis=axis, causal=causal, kernel=kernel,
        mask_mod=mods.get("mask_mod"), score_mod=mods.get("score_mod"),
    )  # fmt: skip


def _all_to_all(q, k, v, kv_lengths, scale, *, mesh, axis, causal, method, options, mods):
    if mods.get("block_mask") is not None:
        raise ValueError(
            "strategy='all_to_all' splits the heads, so a block mask would need its heads split "
            "too; pass mask_mod= instead of block_mask= (it sees global head indices)"
        )
    return all_to_all_attention(
        q, k, v, kv_lengths, scale, mesh=mesh, axis=axis, causal=causal, method=method,
        options=options, mask_mod=mods.get("mask_mod"), score_mod=mods.get("score_mod"),
    )  # fmt: skip


#: strategy name -> implementation(q, k, v, kv_lengths, scale, *, mesh, axis, causal, method,
#: options, mods); the table ``sequence_parallel_attention`` dispatches through.
STRATEGIES: Mapping[str, Callable[..., jax.Array]] = {"ring": _ring, "all_to_all": _all_to_all}


def _check_mesh(mesh: Any, axis: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh); got {type(mesh).__name__}"
        )
    if not isinstance(axis, str) or axis not in mesh.axis_names:
        raise ValueError(f"axis={axis!r} must be one of the mesh axis names {mesh.axis_names}")


def sequence_parallel_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mesh: Mesh,
    axis: str,
    strategy: str = "ring",
    method: str = "blockwise",
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_mask: Any = None,
    **options: Any,
) -> jax.Array:
    """Attention with the sequence dimension split over the mesh axis ``axis``.

    Same layout and semantics as :func:`efficient_attn.attention`
    (bottom-right causal, ``kv_lengths``, GQA, empty rows give zeros). Inputs
    may arrive split or not; any sequence length works (padded and masked
    internally). The output is split along the sequence over ``axis`` where
    its length divides evenly.

    Args:
      query: ``[B, Tq, N, H]``.
      key: ``[B, Tk, K, H]``; value: ``[B, Tk, K, Hv]``.
      mesh: a ``jax.sharding.Mesh`` (``Mesh(...)`` or ``jax.make_mesh``, Auto or
        Explicit axes; with Explicit axes take gradients inside
        ``jax.set_mesh(mesh)``, as JAX requires).
      axis: the mesh axis the sequence is split over; other axes replicate.
      strategy: ``"ring"`` (Liu et al. 2023: K/V shards travel around the
        ring, zigzag layout when causal; memory O(T/P) per device; exact
        methods with an (out, lse) kernel: ``blockwise``, ``dense``) or
        ``"all_to_all"`` (Jacobs et al. 2023: heads are split instead, any
        method; needs K divisible by the axis size).
      method: registered method computing each block (ring) or each head
        group over the full sequence (all_to_all).
      causal, kv_lengths, scale, mask_mod, score_mod, **options: as in
        :func:`efficient_attn.attention` (validated by the same code); mods
        see global positions and, under ``all_to_all``, global head indices; the
        arrays they close over (library mods or plain closures) are replicated
        to every device, and float ones a ``score_mod`` reads get gradients.

    Returns:
      ``[B, Tq, N, Hv]`` in ``query.dtype``.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    _check_mesh(mesh, axis)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; strategies: {', '.join(STRATEGIES)}")
    mods = {"mask_mod": mask_mod, "score_mod": score_mod, "block_mask": block_mask}
    _, _, kv_lengths, scale, opts, _ = prepare(
        query, key, value, method, causal, kv_lengths, scale, options, mods
    )
    causal = bool(causal)
    scale = jnp.asarray(scale, masking.stat_dtype(query.dtype))
    static = {"mesh": mesh, "axis": axis, "strategy": strategy, "method": method, "causal": causal}
    items = tuple(sorted(opts.items()))
    mods = tuple(sorted(mods.items()))
    try:
        hash((items, mods))
    except TypeError:  # unhashable option values or mods holding arrays: run op by op
        return _run.__wrapped__(
            query, key, value, kv_lengths, scale, options=items, mods=mods, **static
        )
    return _run(query, key, value, kv_lengths, scale, options=items, mods=mods, **static)


@functools.partial(
    jax.jit, static_argnames=("mesh", "axis", "strategy", "method", "causal", "options", "mods")
)
def _run(q, k, v, kv_lengths, scale, *, mesh, axis, strategy, method, causal, options, mods):
    """One compiled program per configuration, also for calls outside ``jax.jit``."""
    out = STRATEGIES[strategy](
        q, k, v, kv_lengths, scale,
        mesh=mesh, axis=axis, causal=causal, method=method, options=dict(options),
        mods=dict(mods),
    )  # fmt: skip
    return out.astype(q.dtype)
