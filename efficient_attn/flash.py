"""The tiled online-softmax engine (FlashAttention-2 in pure JAX) with a pluggable score.

Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory"; Dao 2023,
"FlashAttention-2" (online softmax, backward that recomputes tiles from the
saved log-sum-exp). Queries are processed one tile at a time; for each query
tile a loop runs over exactly the key tiles it can see, so tiles above the
causal diagonal and tiles past the longest ``kv_lengths`` are skipped, not
computed and masked. The backward pass loops over key tiles and, inside, over
the query tiles that see them, accumulating dK/dV per key tile and dQ in one
O(N) buffer.

The logits of a tile are ``scale * score(q_i, k_j)``. :data:`DOT` is the
dot product (``blockwise``, ring attention); other scores (``additive``:
``w . tanh(q_i + k_j)``) plug in through :class:`Score` and get the same
O(N)-memory forward and backward, masks, GQA and kv_lengths handling.

The kernel pair :func:`flash_forward` / :func:`flash_backward` works on
explicit token positions, so callers that hold a shard of a longer sequence
(ring attention) reuse it: causal means ``k_pos <= q_pos`` and a key is
padding when ``k_pos >= kv_len[b]``. :func:`flash_attention` is the
differentiable (custom_vjp) attention over one whole sequence.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from efficient_attn import masking

_NEVER = jnp.iinfo(jnp.int32).max  # position of tile padding keys: never visible

# Tiled layouts: queries [nq, B, K, G, bq, H]; keys/values [nk, B, K, bk, H];
# per-row statistics [nq, B, K, G, bq].


def _q_blocks(x: jax.Array, kv_heads: int, block: int, fill: float = 0.0) -> jax.Array:
    """[B, T, N, *D] -> [nb, B, K, G, block, *D], padded with ``fill``."""
    x = jnp.asarray(x)
    b, t, n = x.shape[:3]
    d = x.shape[3:]
    nb = masking.cdiv(t, block)
    x = jnp.pad(x, [(0, 0), (0, nb * block - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = x.reshape(b, nb, block, kv_heads, n // kv_heads, *d)
    return jnp.moveaxis(x, (1, 2), (0, 4))


def _q_unblocks(x: jax.Array, length: int) -> jax.Array:
    """[nb, B, K, G, block, *D] -> [B, length, N, *D]."""
    x = jnp.moveaxis(x, (0, 4), (1, 2))
    b, nb, block, k, g = x.shape[:5]
    return x.reshape(b, nb * block, k * g, *x.shape[5:])[:, :length]


def _kv_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, T, K, H] -> [nb, B, K, block, H] (zero-padded)."""
    x = masking.pad_axis(jnp.asarray(x), 1, block)
    b, t, k, h = x.shape
    return x.reshape(b, t // block, block, k, h).transpose(1, 0, 3, 2, 4)


def _kv_unblocks(x: jax.Array, length: int) -> jax.Array:
    """[nb, B, K, block, D] -> [B, length, K, D]."""
    nb, b, k, block, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nb * block, k, d)[:, :length]


def _pad_positions(pos: jax.Array, block: int, fill) -> jax.Array:
    pos = jnp.asarray(pos, jnp.int32)
    return jnp.pad(
        pos, (0, masking.cdiv(pos.shape[0], block) * block - pos.shape[0]), constant_values=fill
    )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Padded positions of one call and the tile ranges each tile visits."""

    q_pos: jax.Array  # [nq * bq], padded with the last position
    k_pos: jax.Array  # [nk * bk], padded with _NEVER
    kv_end: jax.Array  # [nq]: query tile i visits key tiles [0, kv_end[i])
    q_start: jax.Array  # [nk]: key tile j is visited by query tiles [q_start[j], nq)
    bq: int
    bk: int
    causal: bool

    @classmethod
    def make(cls, q_pos, k_pos, kv_len, *, causal: bool, bq: int, bk: int) -> _Plan:
        q_pos = _pad_positions(q_pos, bq, jnp.asarray(q_pos)[-1])
        k_pos = _pad_positions(k_pos, bk, _NEVER)
        nq, nk = q_pos.shape[0] // bq, k_pos.shape[0] // bk
        max_len = jnp.max(kv_len)
        n_valid = jnp.searchsorted(k_pos, max_len, side="left")  # keys below max kv_len
        q_last = q_pos[bq - 1 :: bq]  # [nq] last position of each query tile
        k_first = k_pos[::bk]  # [nk] first position of each key tile
        if causal:
            n_keys = jnp.minimum(jnp.searchsorted(k_pos, q_last, side="right"), n_valid)
            q_start = jnp.searchsorted(q_pos, k_first, side="left") // bq
        else:
            n_keys = jnp.broadcast_to(n_valid, (nq,))
            q_start = jnp.zeros((nk,), jnp.int32)
        kv_end = (n_keys + bk - 1) // bk
        q_start = jnp.where(k_first >= max_len, nq, q_start)
        return cls(q_pos, k_pos, kv_end, q_start, bq, bk, causal)

    def mask(self, i: jax.Array, j: jax.Array, kv_len: jax.Array) -> jax.Array:
        """Boolean [B, 1, 1, bq, bk]: which pairs of query tile i and key tile j interact."""
        qp = jax.lax.dynamic_slice_in_dim(self.q_pos, i * self.bq, self.bq)[:, None]
        kp = jax.lax.dynamic_slice_in_dim(self.k_pos, j * self.bk, self.bk)[None, :]
        mask = kp < kv_len[:, None, None, None, None]
        return mask & (kp <= qp) if self.causal else mask


class Score:
    """How a tile of unscaled logits is computed from a query tile and a key tile.

    Tiles: ``q_i [B, K, G, bq, D]`` (queries grouped by their K/V head),
    ``k_j [B, K, bk, D]``; logits ``[B, K, G, bq, bk]`` in the statistics dtype
    ``acc``. ``params`` is a pytree of arrays the score depends on (None for
    the dot product), differentiated like q and k. Subclasses are frozen
    dataclasses (hashable: they are static arguments of jitted kernels).
    """

    #: True when ``score(q, k)`` is linear in ``q``: then d(scale) is read off
    #: dq instead of being accumulated tile by tile.
    linear_in_q: bool = False

    def logits(self, params: Any, q_i: jax.Array, k_j: jax.Array, acc: Any) -> jax.Array:
        """Unscaled logits ``[B, K, G, bq, bk]`` of one query tile against one key tile."""
        raise NotImplementedError

    def vjp(
        self, params: Any, q_i: jax.Array, k_j: jax.Array, ds: jax.Array, acc: Any
    ) -> tuple[jax.Array, jax.Array, Any]:
        """``(dq_i, dk_j, dparams)`` for the cotangent ``ds`` of :meth:`logits` (in ``acc``)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DotScore(Score):
    """``q . k`` (Vaswani et al. 2017)."""

    linear_in_q = True

    def logits(self, params, q_i, k_j, acc):
        return jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=acc)

    def vjp(self, params, q_i, k_j, ds, acc):
        ds = ds.astype(q_i.dtype)
        dq = jnp.einsum("bkgqs,bksh->bkgqh", ds, k_j, preferred_element_type=acc)
        dk = jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=acc)
        return dq, dk, None


DOT = DotScore()


def flash_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    kv_len: jax.Array,
    scale: jax.Array,
    *,
    causal: bool,
    block_q: int,
    block_k: int,
    score: Score = DOT,
    params: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Online-softmax forward over tiles: ``(out [B,Tq,N,Hv], lse [B,Tq,N] float32)``.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv]; q_pos: int [Tq] and
    k_pos: int [Tk] non-decreasing token positions; kv_len: int [B]. Query at
    position p sees key at position r iff ``r < kv_len[b]`` and, when causal,
    ``r <= p``. Logits are ``scale * score.logits(params, q_i, k_j)``.
    ``lse`` is -inf for rows that see no key (their output is 0).
    """
    acc = masking.stat_dtype(q.dtype)
    kh = k.shape[2]
    plan = _Plan.make(q_pos, k_pos, kv_len, causal=causal, bq=block_q, bk=block_k)
    qb = _q_blocks(q, kh, block_q)
    kb, vb = _kv_blocks(k, block_k), _kv_blocks(v, block_k)
    scale = jnp.asarray(scale, acc)

    def q_tile(args):
        i, q_i = args  # q_i: [B, K, G, bq, H]
        stats_shape = q_i.shape[:-1]

        def kv_step(j, carry):
            o, m, l = carry
            s = score.logits(params, q_i, kb[j], acc)
            s = jnp.where(plan.mask(i, j, kv_len), s * scale, -jnp.inf)
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
        o, m, l = jax.lax.fori_loop(0, plan.kv_end[i], kv_step, init)
        nonempty = l > 0
        out = o / jnp.where(nonempty, l, 1.0)[..., None]
        lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(q_tile, (jnp.arange(qb.shape[0]), qb))
    tq = q.shape[1]
    return _q_unblocks(out, tq), _q_unblocks(lse, tq)


def flash_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    kv_len: jax.Array,
    scale: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    *,
    causal: bool,
    block_q: int,
    block_k: int,
    score: Score = DOT,
    params: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, Any]:
    """FlashAttention-2 backward from the saved ``out`` and ``lse``: (dq, dk, dv, dscale, dparams).

    Arguments as in :func:`flash_forward`; ``out``/``lse`` may be those of a
    longer attention (all key shards of a ring), in which case the gradients
    are this key shard's contributions (dq summed over shards gives the total).
    O(N) memory: only tiles are materialised; dq accumulates in float32.
    """
    acc = masking.stat_dtype(q.dtype)
    kh = k.shape[2]
    plan = _Plan.make(q_pos, k_pos, kv_len, causal=causal, bq=block_q, bk=block_k)
    qb = _q_blocks(q, kh, block_q)
    dob = _q_blocks(jnp.asarray(dout).astype(q.dtype), kh, block_q)
    lseb = _q_blocks(lse, kh, block_q, fill=jnp.inf)  # [nq, B, K, G, bq]; pad rows: p = 0
    delta = jnp.sum(_q_blocks(out, kh, block_q).astype(acc) * dob.astype(acc), axis=-1)
    kb, vb = _kv_blocks(k, block_k), _kv_blocks(v, block_k)
    scale = jnp.asarray(scale, acc)
    nq = qb.shape[0]

    # dS = dL/d(logits); the vjp is linear in it, so dq, dk and dparams are
    # accumulated from dS and multiplied by ``scale`` once at the end.
    def kv_tile(carry, args):
        dq, dparams, dscale = carry
        j, k_j, v_j = args  # k_j: [B, K, bk, H]

        def q_step(i, carry):
            dk, dv, dq, dparams, dscale = carry
            q_i, do_i = qb[i], dob[i]
            s = score.logits(params, q_i, k_j, acc)
            p = jnp.where(plan.mask(i, j, kv_len), jnp.exp(s * scale - lseb[i][..., None]), 0.0)
            dv = dv + jnp.einsum(
                "bkgqs,bkgqd->bksd", p.astype(v.dtype), do_i, preferred_element_type=acc
            )
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=acc)
            ds = p * (dp - delta[i][..., None])
            dq_i, dk_j, dparams_ij = score.vjp(params, q_i, k_j, ds, acc)
            if not score.linear_in_q:
                dscale = dscale + jnp.sum(ds * s)
            dparams = jax.tree.map(jnp.add, dparams, dparams_ij)
            return dk + dk_j, dv, dq.at[i].add(dq_i), dparams, dscale

        init = (jnp.zeros(k_j.shape, acc), jnp.zeros(v_j.shape, acc), dq, dparams, dscale)
        dk, dv, dq, dparams, dscale = jax.lax.fori_loop(plan.q_start[j], nq, q_step, init)
        return (dq, dparams, dscale), (dk, dv)

    dparams0 = jax.tree.map(lambda x: jnp.zeros(x.shape, acc), params)
    init = (jnp.zeros(qb.shape, acc), dparams0, jnp.zeros((), acc))
    (dq_raw, dparams, dscale), (dk_raw, dv) = jax.lax.scan(
        kv_tile, init, (jnp.arange(kb.shape[0]), kb, vb)
    )
    if score.linear_in_q:  # sum(dS * score) = sum(dQ_raw * Q) for a score linear in q
        dscale = jnp.sum(dq_raw * qb.astype(acc))
    dq = _q_unblocks(dq_raw * scale, q.shape[1]).astype(q.dtype)
    dk = _kv_unblocks(dk_raw * scale, k.shape[1]).astype(k.dtype)
    dv = _kv_unblocks(dv, k.shape[1]).astype(v.dtype)
    dparams = jax.tree.map(lambda g, x: (g * scale).astype(x.dtype), dparams, params)
    return dq, dk, dv, dscale, dparams


def merge_partials(
    out1: jax.Array, lse1: jax.Array, out2: jax.Array, lse2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Combine attention over two disjoint key sets from their (out, lse) pairs.

    out: [B, T, N, Hv], lse: [B, T, N] (-inf where a row saw no key). Returns
    the output over the union of keys, in float32 (float64 if either input is
    float64), and its log-sum-exp.
    """
    acc = jnp.promote_types(masking.stat_dtype(out1.dtype), out2.dtype)
    lse = jnp.logaddexp(lse1, lse2)
    w1 = jnp.where(lse1 == -jnp.inf, 0.0, jnp.exp(lse1 - lse))[..., None]
    w2 = jnp.where(lse2 == -jnp.inf, 0.0, jnp.exp(lse2 - lse))[..., None]
    return w1 * out1.astype(acc) + w2 * out2.astype(acc), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def flash_attention(q, k, v, kv_len, scale, params, causal, block_q, block_k, score):
    """Differentiable tiled attention of a whole sequence (bottom-right causal).

    q: [B, Tq, N, D], k: [B, Tk, K, D], v: [B, Tk, K, Hv], kv_len: int [B],
    scale: float array, params: the score's arrays -> [B, Tq, N, Hv]. Memory
    O(N) forward and backward; gradients for q, k, v, scale and params.
    """
    return _flash_fwd(q, k, v, kv_len, scale, params, causal, block_q, block_k, score)[0]


def _positions(q, k):
    tq, tk = q.shape[1], k.shape[1]
    return jnp.arange(tq, dtype=jnp.int32) + (tk - tq), jnp.arange(tk, dtype=jnp.int32)


def _flash_fwd(q, k, v, kv_len, scale, params, causal, block_q, block_k, score):
    q_pos, k_pos = _positions(q, k)
    out, lse = flash_forward(
        q, k, v, q_pos, k_pos, kv_len, scale,
        causal=causal, block_q=block_q, block_k=block_k, score=score, params=params,
    )  # fmt: skip
    return out, (q, k, v, kv_len, scale, params, out, lse)


def _flash_bwd(causal, block_q, block_k, score, res, dout):
    q, k, v, kv_len, scale, params, out, lse = res
    q_pos, k_pos = _positions(q, k)
    dq, dk, dv, dscale, dparams = flash_backward(
        q, k, v, q_pos, k_pos, kv_len, scale, out, lse, dout,
        causal=causal, block_q=block_q, block_k=block_k, score=score, params=params,
    )  # fmt: skip
    return dq, dk, dv, None, dscale.astype(scale.dtype).reshape(scale.shape), dparams


flash_attention.defvjp(_flash_fwd, _flash_bwd)
