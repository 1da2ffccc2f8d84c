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

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from efficient_attn import masking
from efficient_attn.flash import merge_partials
from efficient_attn.parallel import layout
from efficient_attn.parallel.kernels import RingKernel


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static configuration of one ring call (hashable, for custom_vjp)."""

    mesh: Mesh
    axis: str
    causal: bool
    kernel: RingKernel
    offset: int  # Tk - Tq of the unpadded problem: query i sits at position i + offset

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]

    def shift(self, *xs):
        """Send every array one step along the ring: device i -> i + 1."""
        perm = [(i, (i + 1) % self.size) for i in range(self.size)]
        return tuple(jax.lax.ppermute(x, self.axis, perm) for x in xs)

    def positions(self, src, length: int, offset: int = 0):
        return layout.positions(src, length, self.size, zigzag=self.causal, offset=offset)

    def sees_any(self, q_pos, k_pos, kv_len):
        """Whether any query of this shard sees any key of the held shard."""
        visible = k_pos[0] < jnp.max(kv_len)
        return visible & (k_pos[0] <= q_pos[-1]) if self.causal else visible


def _forward_shard(cfg: _Ring, q, k, v, kv_len, scale):
    """Per device: q [B, Cq, N, H], k [B, Ck, K, H] -> (out [B, Cq, N, Hv], lse [B, Cq, N])."""
    fwd, _ = cfg.kernel.kernels()
    acc = masking.stat_dtype(q.dtype)
    me = jax.lax.axis_index(cfg.axis)
    q_pos = cfg.positions(me, q.shape[1], cfg.offset)
    o0 = jnp.zeros((*q.shape[:3], v.shape[-1]), acc)  # [B, Cq, N, Hv]
    lse0 = jnp.full(q.shape[:3], -jnp.inf, acc)  # [B, Cq, N]

    def step(carry, i):
        k, v, o, lse = carry
        k_next, v_next = cfg.shift(k, v)  # issued before this block's compute
        k_pos = cfg.positions((me - i) % cfg.size, k.shape[1])
        o_i, lse_i = jax.lax.cond(
            cfg.sees_any(q_pos, k_pos, kv_len),
            lambda: fwd(q, k, v, q_pos, k_pos, kv_len, scale, causal=cfg.causal, zigzag=cfg.causal),
            lambda: (o0.astype(q.dtype), lse0),
        )
        o, lse = merge_partials(o, lse, o_i, lse_i.astype(acc))
        return (k_next, v_next, o, lse), None

    (_, _, o, lse), _ = jax.lax.scan(step, (k, v, o0, lse0), jnp.arange(cfg.size))
    return o.astype(q.dtype), lse


def _backward_shard(cfg: _Ring, q, k, v, out, lse, dout, kv_len, scale):
    """Per device: (dq, dk, dv, dscale) with dK/dV accumulated along a second ring."""
    _, bwd = cfg.kernel.kernels()
    acc = masking.stat_dtype(q.dtype)
    me = jax.lax.axis_index(cfg.axis)
    q_pos = cfg.positions(me, q.shape[1], cfg.offset)
    zeros = (*(jnp.zeros(x.shape, x.dtype) for x in (q, k, v)), jnp.zeros((), acc))

    def step(carry, i):
        k, v, dk, dv, dq, dscale = carry
        k_next, v_next = cfg.shift(k, v)
        k_pos = cfg.positions((me - i) % cfg.size, k.shape[1])

        def grads():
            kw = {"causal": cfg.causal, "zigzag": cfg.causal}
            return bwd(q, k, v, q_pos, k_pos, kv_len, scale, out, lse, dout, **kw)

        g = jax.lax.cond(cfg.sees_any(q_pos, k_pos, kv_len), grads, lambda: zeros)
        dk, dv = cfg.shift(dk + g[1], dv + g[2])  # travel with their shard; P hops: home
        return (k_next, v_next, dk, dv, dq + g[0], dscale + g[3].astype(acc)), None

    init = (k, v, *(jnp.zeros(x.shape, acc) for x in (k, v, q)), jnp.zeros((), acc))
    (_, _, dk, dv, dq, dscale), _ = jax.lax.scan(step, init, jnp.arange(cfg.size))
    dscale = jax.lax.psum(dscale, cfg.axis)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dscale


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Ring, q, k, v, kv_len, scale):
    return _ring_fwd(cfg, q, k, v, kv_len, scale)[0]


def _specs(cfg: _Ring):
    return layout.seq_spec(cfg.axis), PartitionSpec()


def _ring_fwd(cfg: _Ring, q, k, v, kv_len, scale):
    seq, rep = _specs(cfg)
    out, lse = layout.shard_map(
        functools.partial(_forward_shard, cfg), cfg.mesh, (seq, seq, seq, rep, rep), (seq, seq)
    )(q, k, v, kv_len, scale)
    return out, (q, k, v, kv_len, scale, out, lse)


def _ring_bwd(cfg: _Ring, res, dout):
    q, k, v, kv_len, scale, out, lse = res
    seq, rep = _specs(cfg)
    dq, dk, dv, dscale = layout.shard_map(
        functools.partial(_backward_shard, cfg),
        cfg.mesh,
        (seq, seq, seq, seq, seq, seq, rep, rep),
        (seq, seq, seq, rep),
    )(q, k, v, out, lse, dout, kv_len, scale)
    return dq, dk, dv, None, dscale.astype(scale.dtype).reshape(scale.shape)


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
) -> jax.Array:
    """Ring attention of global ``q [B,Tq,N,H]`` over ``k [B,Tk,K,H]``, ``v [B,Tk,K,Hv]``.

    ``kv_len``: int [B] valid keys; ``scale``: scalar array. Lengths are padded
    to a multiple of ``P`` (``2P`` when causal, for the zigzag layout); padded
    keys sit at positions ``>= Tk`` and are never visible. Returns
    ``[B, Tq, N, Hv]`` split along the sequence over ``axis``.
    """
    size = mesh.shape[axis]
    tq, tk = q.shape[1], k.shape[1]
    multiple = 2 * size if causal else size
    lq, lk = layout.padded_length(tq, multiple), layout.padded_length(tk, multiple)
    q, k, v = (layout.pad_seq(x, n, mesh, axis) for x, n in ((q, lq), (k, lk), (v, lk)))
    cfg = _Ring(mesh, axis, causal, kernel, tk - tq)
    if causal:
        q, k, v = _relayout(layout.to_zigzag, mesh, axis, q, k, v)
    out = _ring(cfg, q, k, v, kv_len, scale)
    if causal:
        (out,) = _relayout(layout.from_zigzag, mesh, axis, out)
    return layout.unpad_seq(out, tq, mesh, axis)


def _relayout(fn, mesh: Mesh, axis: str, *xs):
    """Apply the per-device relayout ``fn`` (to/from zigzag) to each global array."""
    seq = layout.seq_spec(axis)

    def body(*xs):
        return tuple(fn(x, axis, mesh.shape[axis]) for x in xs)

    return layout.shard_map(body, mesh, (seq,) * len(xs), (seq,) * len(xs))(*xs)
