"""Ring attention: query shards stay, key/value shards travel around the mesh axis.

Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for
Near-Infinite Context"; Brandon et al. 2023, "Striped Attention" (causal load
balance, here in zigzag form, see :mod:`efficient_attn.parallel.layout`).

Each of the ``P`` steps computes the attention of the local queries over the
key/value shard currently held, with an exact (out, lse) kernel
(:mod:`efficient_attn.parallel.kernels`), and merges it into float32
online-softmax statistics; the ``ppermute`` of the next shard is issued before
the current block is computed so the transfer can overlap it (the loop runs
``P`` identical steps, one kernel in the program; the last step's transfer,
which returns each shard home, is hidden behind the last block). Steps whose
shard holds no visible key are skipped. The backward pass is a second ring
(``custom_vjp``): dK/dV accumulators travel with their shards and return home
after ``P`` hops, so per-device memory is O(T/P) in both passes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from efficient_attn.core import masking
from efficient_attn.core import mods as _mods
from efficient_attn.core.blockmask import join_mod, lift, split_mod
from efficient_attn.core.engine.ring import RingMods
from efficient_attn.core.merge import merge_attention
from efficient_attn.parallel import layout
from efficient_attn.parallel.kernels import RingKernel


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static configuration of one ring call (hashable, for custom_vjp)."""

    mesh: Mesh
    axis: str
    causal: bool
    kernel: RingKernel
    offset: int  # Tk - Tq of the unpadded problem (bottom-right causal)
    q_len: int  # unpadded lengths: positions at or past them are padding
    kv_len: int
    mask_static: Any  # the mask mod's treedef (blockmask.split_mod: its arrays are the leaves)
    score_static: Any

    def mods(self, mask_leaves, score_leaves) -> RingMods:
        mask = join_mod(self.mask_static, mask_leaves)
        return RingMods(mask, join_mod(self.score_static, score_leaves), self.q_len, self.kv_len)

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]

    def shift(self, *xs):
        """Send every array one step along the ring: device i -> i + 1."""
        perm = [(i, (i + 1) % self.size) for i in range(self.size)]
        return tuple(jax.lax.ppermute(x, self.axis, perm) for x in xs)

    def positions(self, src, length: int):
        return layout.positions(src, length, self.size, zigzag=self.causal, offset=0)

    def sees_any(self, q_pos, k_pos, kv_len):
        """Whether any query of this shard may see any key of the held shard."""
        visible = k_pos[0] < jnp.max(kv_len)
        return visible & (k_pos[0] <= q_pos[-1] + self.offset) if self.causal else visible


def _forward_shard(cfg: _Ring, q, k, v, kv_len, scale, mask_leaves, score_leaves):
    """Per device: q [B, Cq, N, H], k [B, Ck, K, H] -> (out [B, Cq, N, Hv], lse [B, Cq, N])."""
    fwd, _ = cfg.kernel.kernels()
    mods = cfg.mods(mask_leaves, score_leaves)
    acc = masking.stat_dtype(q.dtype)
    me = jax.lax.axis_index(cfg.axis)
    q_pos = cfg.positions(me, q.shape[1])
    o0 = jnp.zeros((*q.shape[:3], v.shape[-1]), acc)  # [B, Cq, N, Hv]
    lse0 = jnp.full(q.shape[:3], -jnp.inf, acc)  # [B, Cq, N]

    def step(carry, i):
        k, v, o, lse = carry
        k_next, v_next = cfg.shift(k, v)  # issued before this block's compute
        k_pos = cfg.positions((me - i) % cfg.size, k.shape[1])
        o_i, lse_i = jax.lax.cond(
            cfg.sees_any(q_pos, k_pos, kv_len),
            lambda: fwd(q, k, v, q_pos, k_pos, kv_len, scale, mods=mods, zigzag=cfg.causal),
            lambda: (o0.astype(q.dtype), lse0),
        )
        o, lse = merge_attention((o, o_i), (lse, lse_i))
        return (k_next, v_next, o, lse), None

    (_, _, o, lse), _ = jax.lax.scan(step, (k, v, o0, lse0), jnp.arange(cfg.size))
    return o.astype(q.dtype), lse


def _leaf_grads(d_consts, consts, leaves, acc):
    """Cotangents of the score mod's pytree leaves from those of the arrays it closed over."""
    grads = [jnp.zeros(jnp.shape(x), acc) for x in leaves]
    for d, c in zip(d_consts, consts, strict=True):
        hits = [i for i, x in enumerate(leaves) if x is c]
        if not hits:
            raise RuntimeError(
                "a score_mod's hoisted array is not among its leaves (blockmask.split_mod)"
            )
        if d is not None:
            grads[hits[0]] = grads[hits[0]] + d.astype(acc)
    return tuple(grads)


def _backward_shard(cfg: _Ring, q, k, v, out, lse, dout, kv_len, scale, mask_leaves, score_leaves):
    """Per device: (dq, dk, dv, dscale, d score leaves); dK/dV accumulate along a second ring."""
    _, bwd = cfg.kernel.kernels()
    mods = cfg.mods(mask_leaves, score_leaves)
    acc = masking.stat_dtype(q.dtype)
    me = jax.lax.axis_index(cfg.axis)
    q_pos = cfg.positions(me, q.shape[1])
    floats = [i for i, x in enumerate(score_leaves) if jnp.issubdtype(x.dtype, jnp.floating)]

    def grads(k, v, k_pos):
        dq, dk, dv, dscale, d_consts, consts = bwd(
            q, k, v, q_pos, k_pos, kv_len, scale, out, lse, dout, mods=mods, zigzag=cfg.causal
        )
        dl = _leaf_grads(d_consts, consts, score_leaves, acc)
        return dq, dk, dv, dscale.astype(acc), tuple(dl[i] for i in floats)

    def step(carry, i):
        k, v, dk, dv, dq, dscale, dleaves = carry
        k_next, v_next = cfg.shift(k, v)
        k_pos = cfg.positions((me - i) % cfg.size, k.shape[1])
        zeros = jax.tree.map(jnp.zeros_like, (dq, dk, dv, dscale, dleaves))
        g = jax.lax.cond(
            cfg.sees_any(q_pos, k_pos, kv_len), lambda: grads(k, v, k_pos), lambda: zeros
        )
        dk, dv = cfg.shift(dk + g[1], dv + g[2])  # travel with their shard; P hops: home
        dleaves = tuple(a + b for a, b in zip(dleaves, g[4], strict=True))
        return (k_next, v_next, dk, dv, dq + g[0], dscale + g[3], dleaves), None

    dleaves0 = tuple(jnp.zeros(score_leaves[i].shape, acc) for i in floats)
    init = (k, v, *(jnp.zeros(x.shape, acc) for x in (k, v, q)), jnp.zeros((), acc), dleaves0)
    (_, _, dk, dv, dq, dscale, dleaves), _ = jax.lax.scan(step, init, jnp.arange(cfg.size))
    dscale = jax.lax.psum(dscale, cfg.axis)
    dleaves = tuple(jax.lax.psum(x, cfg.axis) for x in dleaves)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dscale, dleaves


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Ring, q, k, v, kv_len, scale, mask_leaves, score_leaves):
    return _ring_fwd(cfg, q, k, v, kv_len, scale, mask_leaves, score_leaves)[0]


def _specs(cfg: _Ring):
    return layout.seq_spec(cfg.axis), PartitionSpec()


def _ring_fwd(cfg: _Ring, q, k, v, kv_len, scale, mask_leaves, score_leaves):
    seq, rep = _specs(cfg)
    reps = (rep,) * (len(mask_leaves) + len(score_leaves))
    nm = len(mask_leaves)

    def body(q, k, v, kv_len, scale, *leaves):
        return _forward_shard(cfg, q, k, v, kv_len, scale, leaves[:nm], leaves[nm:])

    out, lse = layout.shard_map(body, cfg.mesh, (seq, seq, seq, rep, rep, *reps), (seq, seq))(
        q, k, v, kv_len, scale, *mask_leaves, *score_leaves
    )
    return out, (q, k, v, kv_len, scale, mask_leaves, score_leaves, out, lse)


def _ring_bwd(cfg: _Ring, res, dout):
    q, k, v, kv_len, scale, mask_leaves, score_leaves, out, lse = res
    seq, rep = _specs(cfg)
    nm = len(mask_leaves)
    floats = [i for i, x in enumerate(score_leaves) if jnp.issubdtype(x.dtype, jnp.floating)]
    reps = (rep,) * (len(mask_leaves) + len(score_leaves))

    def body(q, k, v, out, lse, dout, kv_len, scale, *leaves):
        return _backward_shard(
            cfg, q, k, v, out, lse, dout, kv_len, scale, leaves[:nm], leaves[nm:]
        )

    dq, dk, dv, dscale, dleaves = layout.shard_map(
        body,
        cfg.mesh,
        (seq, seq, seq, seq, seq, seq, rep, rep, *reps),
        (seq, seq, seq, rep, tuple(rep for _ in floats)),
    )(q, k, v, out, lse, dout, kv_len, scale, *mask_leaves, *score_leaves)
    d_score = [None] * len(score_leaves)
    for i, g in zip(floats, dleaves, strict=True):
        d_score[i] = g.astype(score_leaves[i].dtype)
    dscale = dscale.astype(scale.dtype).reshape(scale.shape)
    return dq, dk, dv, None, dscale, tuple(None for _ in mask_leaves), tuple(d_score)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_len: jax.Array,
    scale: jax.Array,
    *,
    mesh: Mesh,
    axis: str,
    causal: bool,
    kernel: RingKernel,
    mask_mod: Any = None,
    score_mod: Any = None,
) -> jax.Array:
    """Ring attention of global ``q [B,Tq,N,H]`` over ``k [B,Tk,K,H]``, ``v [B,Tk,K,Hv]``.

    ``kv_len``: int [B] valid keys; ``scale``: scalar array; ``mask_mod`` and
    ``score_mod`` see global positions (document masks and windows work
    across shards); the arrays they close over, library mods' leaves or a plain
    function's captures (:func:`efficient_attn.core.blockmask.lift`), are
    replicated to every shard, and float ones a ``score_mod`` reads get gradients.
    Lengths are padded to a multiple of ``P`` (``2P`` when causal, for the zigzag
    layout); padded keys sit at positions ``>= Tk`` and are never visible. Returns
    ``[B, Tq, N, Hv]`` split along the sequence over ``axis``.
    """
    size = mesh.shape[axis]
    tq, tk = q.shape[1], k.shape[1]
    multiple = 2 * size if causal else size
    lq, lk = layout.padded_length(tq, multiple), layout.padded_length(tk, multiple)
    q, k, v = (layout.pad_seq(x, n, mesh, axis) for x, n in ((q, lq), (k, lk), (v, lk)))
    mask_mod = lift("mask_mod", mask_mod)  # closed-over arrays: leaves, replicated to shards
    parts = [m for m in (_mods.causal_bottom_right(tq, tk) if causal else None, mask_mod) if m]
    mask = (
        _mods.full_mask() if not parts else parts[0] if len(parts) == 1 else _mods.and_masks(*parts)
    )
    mask_leaves, mask_static = split_mod("mask_mod", mask)
    score_leaves, score_static = split_mod("score_mod", score_mod)
    cfg = _Ring(mesh, axis, causal, kernel, tk - tq, tq, tk, mask_static, score_static)
    if causal:
        q, k, v = _relayout(layout.to_zigzag, mesh, axis, q, k, v)
    out = _ring(cfg, q, k, v, kv_len, scale, mask_leaves, score_leaves)
    if causal:
        (out,) = _relayout(layout.from_zigzag, mesh, axis, out)
    return layout.unpad_seq(out, tq, mesh, axis)


def _relayout(fn, mesh: Mesh, axis: str, *xs):
    """Apply the per-device relayout ``fn`` (to/from zigzag) to each global array."""
    seq = layout.seq_spec(axis)

    def body(*xs):
        return tuple(fn(x, axis, mesh.shape[axis]) for x in xs)

    return layout.shard_map(body, mesh, (seq,) * len(xs), (seq,) * len(xs))(*xs)
