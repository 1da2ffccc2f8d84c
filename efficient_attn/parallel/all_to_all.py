"""All-to-all (DeepSpeed-Ulysses) sequence parallelism: swap the sequence split for a head split.

Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling
Training of Extreme Long Sequence Transformer Models". One ``all_to_all``
turns ``[B, T/P, N, H]`` shards into ``[B, T, N/P, H]``; any registered method
(approximate ones included) then runs on the full sequence for its ``N/P``
heads, exactly as on one device, and a second ``all_to_all`` turns the output
back. The K/V heads are split the same way, so the GQA grouping (query head
``n`` uses K/V head ``n // G``) stays within a device; this needs ``K % P == 0``.
Gradients are JAX's own: the transpose of ``all_to_all`` is ``all_to_all``.
Mods see global head indices (the local head plus this device's first head).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from efficient_attn.core.api import attention
from efficient_attn.core.blockmask import join_mod, split_mod
from efficient_attn.core.mods.base import Mask, Score, _pytree
from efficient_attn.parallel import layout


def check_heads(kv_heads: int, mesh: Mesh, axis: str) -> None:
    size = mesh.shape[axis]
    if kv_heads % size != 0:
        raise ValueError(
            f"strategy='all_to_all' splits heads over mesh axis {axis!r} of size {size}: "
            f"the number of key/value heads K={kv_heads} must be divisible by {size} "
            "(use strategy='ring', or a mesh axis whose size divides K)"
        )


@_pytree("mod", "offset")
@dataclasses.dataclass(frozen=True)
class _HeadOffsetMask(Mask):
    """``mod`` at global head indices: the local head ``h`` of this device is ``h + offset``."""

    mod: Any
    offset: Any

    def __call__(self, b, h, q_idx, kv_idx):
        return self.mod(b, h + self.offset, q_idx, kv_idx)


@_pytree("mod", "offset")
@dataclasses.dataclass(frozen=True)
class _HeadOffsetScore(Score):
    mod: Any
    offset: Any

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.mod(score, b, h + self.offset, q_idx, kv_idx)


def all_to_all_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_lengths: jax.Array | None,
    scale: jax.Array,
    *,
    mesh: Mesh,
    axis: str,
    causal: bool,
    method: str,
    options: dict[str, Any],
    mask_mod: Any = None,
    score_mod: Any = None,
) -> jax.Array:
    """``q [B,Tq,N,H]``, ``k [B,Tk,K,H]``, ``v [B,Tk,K,Hv]`` -> ``[B,Tq,N,Hv]`` split along T.

    ``mask_mod``/``score_mod`` see global positions and global query-head indices
    (device ``d`` holds heads ``[d N/P, (d+1) N/P)``); the arrays they close over are
    replicated inputs of every device (:func:`efficient_attn.core.blockmask.lift`).
    """
    check_heads(k.shape[2], mesh, axis)
    size = mesh.shape[axis]
    tq, tk = q.shape[1], k.shape[1]
    lq, lk = layout.padded_length(tq, size), layout.padded_length(tk, size)
    q, k, v = (layout.pad_seq(x, n, mesh, axis) for x, n in ((q, lq), (k, lk), (v, lk)))
    mask_leaves, mask_static = split_mod("mask_mod", mask_mod)
    score_leaves, score_static = split_mod("score_mod", score_mod)
    nm, ns = len(mask_leaves), len(score_leaves)
    heads = q.shape[2] // size  # query heads per device

    def to_heads(x, length):  # [B, L/P, M, D] -> [B, length, M/P, D]
        return jax.lax.all_to_all(x, axis, 2, 1, tiled=True)[:, :length]

    def body(q, k, v, scale, *rest):
        mods = {}
        offset = jax.lax.axis_index(axis) * heads
        if mask_static is not None:
            mods["mask_mod"] = _HeadOffsetMask(join_mod(mask_static, rest[:nm]), offset)
        if score_static is not None:
            mods["score_mod"] = _HeadOffsetScore(join_mod(score_static, rest[nm : nm + ns]), offset)
        kv_len = rest[nm + ns :]
        out = attention(
            to_heads(q, tq), to_heads(k, tk), to_heads(v, tk),
            method=method, causal=causal, kv_lengths=kv_len[0] if kv_len else None,
            scale=scale, **mods, **options,
        )  # fmt: skip
        out = jnp.pad(out, [(0, 0), (0, lq - tq), (0, 0), (0, 0)])
        return jax.lax.all_to_all(out, axis, 1, 2, tiled=True)  # [B, Lq/P, N, Hv]

    seq, rep = layout.seq_spec(axis), PartitionSpec()
    lengths = () if kv_lengths is None else (kv_lengths,)
    args = (q, k, v, scale, *mask_leaves, *score_leaves, *lengths)
    specs = (seq, seq, seq) + (rep,) * (1 + nm + ns + len(lengths))
    out = layout.shard_map(body, mesh, specs, seq)(*args)
    return layout.unpad_seq(out, tq, mesh, axis)
