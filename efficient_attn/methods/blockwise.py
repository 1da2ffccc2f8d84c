"""Blockwise (flash-style) exact attention in pure JAX, O(N) memory forward and backward.

Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory"; Dao 2023,
"FlashAttention-2" (online softmax, backward that recomputes tiles from the
saved log-sum-exp). Queries are processed one tile at a time; for each query
tile a loop runs over exactly the key tiles it can see, so tiles above the
causal diagonal and tiles past the longest ``kv_lengths`` are skipped, not
computed and masked. The backward pass is a ``custom_vjp`` that loops over key
tiles and, inside, over the query tiles that see them, accumulating dK/dV per
key tile and dQ in one O(N) buffer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from efficient_attn import masking
from efficient_attn.registry import register_method

# [nb, B, K, G, b, H]: query tiles; [nb, B, K, b, H]: key/value tiles.


def _q_blocks(q: jax.Array, kv_heads: int, block: int) -> jax.Array:
    """[B, T, N, H] -> [nb, B, K, G, block, H] (zero-padded)."""
    x = masking.pad_axis(masking.group_queries(jnp.asarray(q), kv_heads), 1, block)
    b, t, k, g, h = x.shape
    return x.reshape(b, t // block, block, k, g, h).transpose(1, 0, 3, 4, 2, 5)


def _q_unblocks(x: jax.Array, length: int) -> jax.Array:
    """[nb, B, K, G, block, D] -> [B, length, N, D]."""
    nb, b, k, g, block, d = x.shape
    x = x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nb * block, k * g, d)
    return x[:, :length]


def _kv_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, T, K, H] -> [nb, B, K, block, H] (zero-padded)."""
    x = masking.pad_axis(jnp.asarray(x), 1, block)
    b, t, k, h = x.shape
    return x.reshape(b, t // block, block, k, h).transpose(1, 0, 3, 2, 4)


def _kv_unblocks(x: jax.Array, length: int) -> jax.Array:
    """[nb, B, K, block, D] -> [B, length, K, D]."""
    nb, b, k, block, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nb * block, k, d)[:, :length]


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static tiling of one call and the tile ranges each tile must visit."""

    tq: int
    tk: int
    bq: int
    bk: int
    causal: bool

    @property
    def nq(self) -> int:
        return masking.cdiv(self.tq, self.bq)

    @property
    def nk(self) -> int:
        return masking.cdiv(self.tk, self.bk)

    @property
    def offset(self) -> int:
        return self.tk - self.tq

    def kv_range_end(self, i: jax.Array, max_len: jax.Array) -> jax.Array:
        """Key tiles [0, end) that query tile ``i`` sees."""
        end = jnp.minimum(self.nk, (max_len + self.bk - 1) // self.bk)
        if self.causal:
            last_q = jnp.minimum((i + 1) * self.bq, self.tq) - 1
            last_k = last_q + self.offset
            end = jnp.minimum(end, jnp.where(last_k < 0, 0, last_k // self.bk + 1))
        return end

    def q_range_start(self, j: jax.Array, max_len: jax.Array) -> jax.Array:
        """Query tiles [start, nq) that see key tile ``j``."""
        start = jnp.where(j * self.bk >= max_len, self.nq, 0)
        if self.causal:
            first_q = j * self.bk - self.offset  # first query that sees key j*bk
            causal_start = jnp.where(
                first_q >= self.tq, self.nq, jnp.maximum(first_q, 0) // self.bq
            )
            start = jnp.maximum(start, causal_start)
        return start

    def mask(self, i: jax.Array, j: jax.Array, kv_len: jax.Array) -> jax.Array:
        """Boolean [B, 1, 1, bq, bk] mask of query tile i against key tile j."""
        q_pos = i * self.bq + jnp.arange(self.bq)[:, None]
        k_pos = j * self.bk + jnp.arange(self.bk)[None, :]
        return masking.visible(
            q_pos, k_pos, kv_len[:, None, None, None, None], causal=self.causal, offset=self.offset
        )


def _forward(q, k, v, kv_len, scale, geo: _Geometry):
    """Online-softmax forward. Returns (out [B,Tq,N,Hv], lse [nq,B,K,G,bq])."""
    acc = masking.stat_dtype(q.dtype)
    kh = k.shape[2]
    qb = _q_blocks(q, kh, geo.bq)
    kb, vb = _kv_blocks(k, geo.bk), _kv_blocks(v, geo.bk)
    max_len = jnp.max(kv_len)
    scale = jnp.asarray(scale, acc)

    def q_tile(args):
        i, q_i = args  # q_i: [B, K, G, bq, H]
        stats_shape = q_i.shape[:-1]

        def kv_step(j, carry):
            o, m, l = carry
            s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, kb[j], preferred_element_type=acc)
            s = jnp.where(geo.mask(i, j, kv_len), s * scale, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum(
                "bkgqs,bksd->bkgqd", p.astype(v.dtype), vb[j], preferred_element_type=acc
            )
            return o * alpha[..., None] + pv, m_new, l * alpha + p.sum(-1)

        init = (
            jnp.zeros((*stats_shape, v.shape[-1]), acc),
            jnp.full(stats_shape, -jnp.inf, acc),
            jnp.zeros(stats_shape, acc),
        )
        o, m, l = jax.lax.fori_loop(0, geo.kv_range_end(i, max_len), kv_step, init)
        nonempty = l > 0
        out = o / jnp.where(nonempty, l, 1.0)[..., None]
        lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), jnp.inf)
        return out.astype(q.dtype), lse

    out_b, lse = jax.lax.map(q_tile, (jnp.arange(geo.nq), qb))
    return _q_unblocks(out_b, geo.tq), lse


def _backward(q, k, v, kv_len, scale, out, lse, dout, geo: _Geometry):
    """FlashAttention-2 backward: recompute tiles from ``lse``; O(N) memory."""
    acc = masking.stat_dtype(q.dtype)
    kh = k.shape[2]
    qb, dob = _q_blocks(q, kh, geo.bq), _q_blocks(dout.astype(q.dtype), kh, geo.bq)
    delta = jnp.sum(
        _q_blocks(out, kh, geo.bq).astype(acc) * dob.astype(acc), axis=-1
    )  # [nq, B, K, G, bq]
    kb, vb = _kv_blocks(k, geo.bk), _kv_blocks(v, geo.bk)
    max_len = jnp.max(kv_len)
    scale_acc = jnp.asarray(scale, acc)

    def kv_tile(dq, args):
        j, k_j, v_j = args  # k_j: [B, K, bk, H]

        def q_step(i, carry):
            dk, dv, dq = carry
            q_i, do_i = qb[i], dob[i]
            s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=acc)
            p = jnp.where(geo.mask(i, j, kv_len), jnp.exp(s * scale_acc - lse[i][..., None]), 0.0)
            dv = dv + jnp.einsum(
                "bkgqs,bkgqd->bksd", p.astype(v.dtype), do_i, preferred_element_type=acc
            )
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=acc)
            ds = (p * (dp - delta[i][..., None])).astype(q.dtype)  # d logits
            dq_i = jnp.einsum("bkgqs,bksh->bkgqh", ds, k_j, preferred_element_type=acc)
            dq = dq.at[i].add(dq_i)
            dk = dk + jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=acc)
            return dk, dv, dq

        init = (jnp.zeros(k_j.shape, acc), jnp.zeros(v_j.shape, acc), dq)
        start = geo.q_range_start(j, max_len)
        dk, dv, dq = jax.lax.fori_loop(start, geo.nq, q_step, init)
        return dq, (dk, dv)

    dq0 = jnp.zeros(qb.shape, acc)
    dq_raw, (dk_raw, dv) = jax.lax.scan(kv_tile, dq0, (jnp.arange(geo.nk), kb, vb))
    dscale = jnp.sum(dq_raw * qb.astype(acc))  # d out / d scale = sum(dS * QK^T)
    dq = _q_unblocks(dq_raw * scale_acc, geo.tq).astype(q.dtype)
    dk = _kv_unblocks(dk_raw * scale_acc, geo.tk).astype(k.dtype)
    dv = _kv_unblocks(dv, geo.tk).astype(v.dtype)
    return dq, dk, dv, dscale


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q, k, v, kv_len, scale, geo):
    return _forward(q, k, v, kv_len, scale, geo)[0]


def _blockwise_fwd(q, k, v, kv_len, scale, geo):
    out, lse = _forward(q, k, v, kv_len, scale, geo)
    return out, (q, k, v, kv_len, scale, out, lse)


def _blockwise_bwd(geo, res, dout):
    q, k, v, kv_len, scale, out, lse = res
    dq, dk, dv, dscale = _backward(q, k, v, kv_len, scale, out, lse, dout, geo)
    dscale = jnp.asarray(dscale, jnp.result_type(scale)).reshape(jnp.shape(scale))
    return dq, dk, dv, None, dscale


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _check_block(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


@register_method("blockwise", exact=True)
def blockwise(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    block_q: int = 512,
    block_k: int = 256,
) -> jax.Array:
    """Memory-efficient exact attention (Rabe & Staats 2021; FlashAttention-2 online softmax).

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    Any lengths (tiles are padded and masked internally); tiles of
    ``block_q`` queries and ``block_k`` keys (clipped to the sequence length).
    """
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    b, tq = q.shape[:2]
    tk = k.shape[1]
    geo = _Geometry(tq, tk, min(block_q, tq), min(block_k, tk), causal)
    kv_len = masking.full_kv_lengths(kv_lengths, b, tk)
    scale = jnp.asarray(scale, masking.stat_dtype(q.dtype))
    return _blockwise(q, k, v, kv_len, scale, geo)
