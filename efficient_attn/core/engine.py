"""The tile engine: FlashAttention-2 in pure JAX over a block mask, with mods and a pluggable score.

Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory"; Dao 2023,
"FlashAttention-2" (online softmax; a backward that recomputes tiles from the
saved log-sum-exp); Dong et al. 2024, "FlexAttention" (``mask_mod``,
``score_mod`` and block masks). Every exact tiled method runs here:
``blockwise``, the sparse methods (their patterns are mask mods), ``additive``
(its own :class:`Score`) and the ring kernels.

For each query tile the forward runs an online softmax over the key tiles
its :class:`~efficient_attn.core.blockmask.BlockMask` lists: first the partial
tiles, where the ``mask_mod`` is evaluated, then the full ones, which run
without any in-tile mask; empty tiles are never touched. The backward loops
over key tiles and, inside, over the query tiles that visit them (the
transposed lists), accumulating dK/dV per key tile and dQ in one O(N) buffer.

A tile's logits are ``score_mod(scale * score(q_i, k_j), b, h, q_idx,
kv_idx)``; keys at positions ``>= kv_len[b]`` are invisible, and tiles whose
keys all lie there are skipped. The arrays a mod closes over are hoisted into
explicit arguments of the ``custom_vjp`` (:func:`efficient_attn.core.blockmask.hoist`),
so gradients reach learned score tables and slopes. Rows that see no key give
a zero output and a log-sum-exp of ``-inf`` (one convention for every caller).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core import blockmask as _bm
from efficient_attn.core import masking
from efficient_attn.core import mods as _mods

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


@dataclasses.dataclass(frozen=True, eq=False)
class _Static:
    """Everything static about one engine call (a nondiff argument of the custom_vjp)."""

    bq: int
    bk: int
    score: Score
    mask_fn: Any  # hoisted mask_mod(b, h, q, kv, *consts) or None: partial tiles check bounds only
    score_fn: Any  # hoisted score_mod(s, b, h, q, kv, *consts) or None
    q_limit: int  # positions >= q_limit / k_limit are padding
    k_limit: int
    bias_qk: tuple[bool, bool] = (False, False)  # the bias varies along (queries, keys)
    dropout_rate: float = 0.0
    dropout_broadcast: bool = False


def _head_index(b: int, kh: int, g: int):
    """Index arrays of a tile ``[B, K, G, bq, bk]``: b ``[B,1,1,1,1]``, h ``[1,K,G,1,1]``."""
    bi = np.arange(b, dtype=np.int32).reshape(b, 1, 1, 1, 1)  # NumPy: constants
    hi = np.arange(kh, dtype=np.int32)[:, None] * g + np.arange(g, dtype=np.int32)
    return bi, hi.reshape(1, kh, g, 1, 1)


class _Tile:
    """Positions, masks and mods of one (query tile, key tile) pair."""

    def __init__(self, st: _Static, idx, q_pos, k_pos, i, j, kv_len, mask_consts, score_consts):
        self.st = st
        qp = jax.lax.dynamic_slice_in_dim(q_pos, i * st.bq, st.bq)
        kp = jax.lax.dynamic_slice_in_dim(k_pos, j * st.bk, st.bk)
        self.b, self.h = idx
        self.i, self.j = i, j
        self.qi = jnp.minimum(qp, st.q_limit - 1).reshape(1, 1, 1, -1, 1)
        self.ki = jnp.minimum(kp, st.k_limit - 1).reshape(1, 1, 1, 1, -1)
        self.q_ok, self.k_ok = qp < st.q_limit, kp < st.k_limit
        self.kv_ok = None if kv_len is None else kp[None, :] < kv_len[:, None]  # [B, bk]
        self.mask_consts, self.score_consts = mask_consts, score_consts

    def mask(self, partial: bool):
        """Bool mask broadcastable to ``[B, K, G, bq, bk]``, or None when every pair is visible."""
        mask = None
        if partial:
            mask = self.q_ok[:, None] & self.k_ok[None, :]
            if self.st.mask_fn is not None:
                mask = mask & self.st.mask_fn(self.b, self.h, self.qi, self.ki, *self.mask_consts)
        if self.kv_ok is not None:
            kv = self.kv_ok[:, None, None, None, :]
            mask = kv if mask is None else mask & kv
        return mask

    def values(self, v_j):
        """``v_j [B, K, bk, D]`` (keys or values) with padding keys zeroed: NaN never leaks."""
        return v_j if self.kv_ok is None else jnp.where(self.kv_ok[:, None, :, None], v_j, 0)

    def modded(self, s, consts):
        return self.st.score_fn(s, self.b, self.h, self.qi, self.ki, *consts)

    def _bias_window(self, bias):
        st = self.st
        bq, bk = st.bias_qk
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, self.i * st.bq if bq else zero, self.j * st.bk if bk else zero)
        start = tuple(jnp.asarray(x, jnp.int32) for x in start)
        size = (*bias.shape[:2], st.bq if bq else 1, st.bk if bk else 1)
        return start, size

    def bias(self, bias):
        """This tile's window of the padded bias ``[B|1, N|1, Tq|1, Tk|1]`` (heads as K, G)."""
        start, size = self._bias_window(bias)
        t = jax.lax.dynamic_slice(bias, start, size)
        kh, g = self.h.shape[1:3]
        heads = (kh, g) if size[1] > 1 else (1, 1)
        return t.reshape(size[0], *heads, *size[2:])

    def add_bias_grad(self, dbias, ds):
        """``dbias`` plus this tile's ``ds [B, K, G, bq, bk]``, summed over broadcast dims."""
        start, size = self._bias_window(dbias)
        g = ds.reshape(ds.shape[0], -1, *ds.shape[3:])  # [B, N, bq, bk]
        g = jnp.sum(g, axis=tuple(a for a in range(4) if size[a] == 1 and g.shape[a] > 1),
                    keepdims=True)  # fmt: skip
        g = g.astype(dbias.dtype)
        if not all(self.st.bias_qk):  # the window is shared by several tiles: accumulate
            g = g + jax.lax.dynamic_slice(dbias, start, size)
        # else each (query tile, key tile) window is visited once: a plain write
        return jax.lax.dynamic_update_slice(dbias, g, start)

    def dropout(self, seed):
        """``drop(x)``: the counter-based dropout of this tile, its mask drawn once
        (the identity without dropout)."""
        st = self.st
        if not st.dropout_rate:
            return lambda x: x
        drop = masking.Dropout(st.dropout_rate, seed, st.dropout_broadcast)
        keep = drop.keep(self.b, self.h, self.qi, self.ki)
        return lambda x: drop.scale(x, keep)


def _live(lst, count, k_first, max_len):
    """Entries of ``lst`` (ascending key tiles) before the first tile past ``max_len``."""
    if max_len is None:
        return count
    return jnp.sum((jnp.arange(lst.shape[0]) < count) & (k_first[lst] < max_len))


def _forward(st: _Static, q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists,
             mask_consts, bias, seed):  # fmt: skip
    """Online softmax over the listed tiles: ``(out [B, Tq, N, Hv], lse [B, Tq, N])``."""
    acc = masking.stat_dtype(q.dtype)
    b, _, n, _ = q.shape
    kh = k.shape[2]
    idx = _head_index(b, kh, n // kh)
    qb = _q_blocks(q, kh, st.bq)
    kb, vb = _kv_blocks(k, st.bk), _kv_blocks(v, st.bk)
    k_first = k_pos[:: st.bk]
    max_len = None if kv_len is None else jnp.max(kv_len)
    part_num, part_idx, full_num, full_idx = lists[:4]

    def q_tile(args):
        i, q_i, p_num, p_idx, f_num, f_idx = args  # q_i: [B, K, G, bq, H]
        stats_shape = q_i.shape[:-1]

        def run(partial, lst):
            def body(t, carry):
                o, m, l = carry
                j = lst[t]
                tile = _Tile(st, idx, q_pos, k_pos, i, j, kv_len, mask_consts, score_consts)
                s = st.score.logits(params, q_i, tile.values(kb[j]), acc) * scale
                if bias is not None:
                    s = s + tile.bias(bias).astype(acc)
                if st.score_fn is not None:
                    s = tile.modded(s, score_consts)
                mask = tile.mask(partial)
                if mask is not None:
                    s = jnp.where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = jnp.einsum(
                    "bkgqs,bksd->bkgqd", tile.dropout(seed)(p).astype(v.dtype), tile.values(vb[j]),
                    preferred_element_type=acc,
                )  # fmt: skip
                return o * alpha[..., None] + pv, m_new, l * alpha + p.sum(-1)

            return body

        carry = (
            jnp.zeros((*stats_shape, v.shape[-1]), acc),
            jnp.full(stats_shape, -jnp.inf, acc),
            jnp.zeros(stats_shape, acc),
        )
        carry = jax.lax.fori_loop(0, _live(p_idx, p_num, k_first, max_len), run(True, p_idx), carry)
        carry = jax.lax.fori_loop(
            0, _live(f_idx, f_num, k_first, max_len), run(False, f_idx), carry
        )
        o, m, l = carry
        nonempty = l > 0
        out = o / jnp.where(nonempty, l, 1.0)[..., None]
        lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)
        return out.astype(q.dtype), lse

    nq = qb.shape[0]
    xs = (jnp.arange(nq), qb, *(jnp.asarray(x) for x in (part_num, part_idx, full_num, full_idx)))
    out, lse = jax.lax.map(q_tile, xs)
    tq = q.shape[1]
    return _q_unblocks(out, tq), _q_unblocks(lse, tq)


def _floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _backward(st: _Static, res, cotangents):
    """FlashAttention-2 backward from the saved ``out``/``lse``, with the cotangent of ``lse``."""
    (q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists, mask_consts, bias, seed,
     out, lse) = res  # fmt: skip
    dout, dlse = cotangents
    acc = masking.stat_dtype(q.dtype)
    b, _, n, _ = q.shape
    kh = k.shape[2]
    idx = _head_index(b, kh, n // kh)
    qb = _q_blocks(q, kh, st.bq)
    dob = _q_blocks(jnp.asarray(dout).astype(q.dtype), kh, st.bq)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows that see nothing: p = 0
    lseb = _q_blocks(lse, kh, st.bq, fill=jnp.inf)  # [nq, B, K, G, bq]; pad rows: p = 0
    # d lse / d s = p, so the lse cotangent enters as ds = p * (dp - (delta - dlse)).
    delta = jnp.sum(_q_blocks(out, kh, st.bq).astype(acc) * dob.astype(acc), axis=-1)
    delta = delta - _q_blocks(jnp.asarray(dlse, acc), kh, st.bq)
    kb, vb = _kv_blocks(k, st.bk), _kv_blocks(v, st.bk)
    k_first = k_pos[:: st.bk]
    max_len = None if kv_len is None else jnp.max(kv_len)
    diff = [i for i, c in enumerate(score_consts) if _floating(c)]
    part_num, part_idx, full_num, full_idx = lists[4:]

    def kv_tile(carry, args):
        j, k_j, v_j, p_num, p_idx, f_num, f_idx = args  # k_j: [B, K, bk, H]

        def run(partial, lst):
            def body(t, carry):
                dk, dv, dq, dparams, dconsts, dscale, dbias = carry
                i = lst[t]
                q_i, do_i = qb[i], dob[i]
                tile = _Tile(st, idx, q_pos, k_pos, i, j, kv_len, mask_consts, score_consts)
                k_jj = tile.values(k_j)  # padding keys may hold NaN: they never reach dq
                raw = st.score.logits(params, q_i, k_jj, acc)
                s = raw * scale
                if bias is not None:
                    s = s + tile.bias(bias).astype(acc)
                if st.score_fn is not None:

                    def modded(s, *floats):
                        consts = list(score_consts)
                        for c, x in zip(diff, floats, strict=True):
                            consts[c] = x
                        return tile.modded(s, consts)

                    s, mod_vjp = jax.vjp(modded, s, *(score_consts[c] for c in diff))
                mask = tile.mask(partial)
                p = jnp.exp(s - lseb[i][..., None])
                vv = tile.values(v_j)
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                drop = tile.dropout(seed)  # one mask for p and dp
                dv = dv + jnp.einsum(
                    "bkgqs,bkgqd->bksd", drop(p).astype(v.dtype), do_i,
                    preferred_element_type=acc,
                )  # fmt: skip
                dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, vv, preferred_element_type=acc)
                ds = p * (drop(dp) - delta[i][..., None])
                if mask is not None:
                    ds = jnp.where(mask, ds, 0.0)
                if st.score_fn is not None:
                    ds, *dc = mod_vjp(ds)
                    dconsts = tuple(a + g.astype(a.dtype) for a, g in zip(dconsts, dc, strict=True))
                if bias is not None:
                    dbias = tile.add_bias_grad(dbias, ds)
                dq_i, dk_j, dparams_ij = st.score.vjp(params, q_i, k_jj, ds, acc)
                if not st.score.linear_in_q:
                    dscale = dscale + jnp.sum(ds * raw)
                dparams = jax.tree.map(jnp.add, dparams, dparams_ij)
                return dk + dk_j, dv, dq.at[i].add(dq_i), dparams, dconsts, dscale, dbias

            return body

        dq, dparams, dconsts, dscale, dbias = carry
        inner = (jnp.zeros(k_j.shape, acc), jnp.zeros(v_j.shape, acc), dq, dparams, dconsts, dscale,
                 dbias)  # fmt: skip
        skip = None if max_len is None else k_first[j] >= max_len
        for partial, num, lst in ((True, p_num, p_idx), (False, f_num, f_idx)):
            count = num if skip is None else jnp.where(skip, 0, num)
            inner = jax.lax.fori_loop(0, count, run(partial, lst), inner)
        dk, dv, dq, dparams, dconsts, dscale, dbias = inner
        return (dq, dparams, dconsts, dscale, dbias), (dk, dv)

    dparams0 = jax.tree.map(lambda x: jnp.zeros(x.shape, acc), params)
    dconsts0 = tuple(jnp.zeros(jnp.shape(score_consts[c]), acc) for c in diff)
    dbias0 = None if bias is None else jnp.zeros(bias.shape, acc)
    init = (jnp.zeros(qb.shape, acc), dparams0, dconsts0, jnp.zeros((), acc), dbias0)
    xs = (
        jnp.arange(kb.shape[0]),
        kb,
        vb,
        *(jnp.asarray(x) for x in (part_num, part_idx, full_num, full_idx)),
    )
    (dq_raw, dparams, dconsts, dscale, dbias), (dk_raw, dv) = jax.lax.scan(kv_tile, init, xs)
    if st.score.linear_in_q:  # sum(dS * score) = sum(dQ_raw * Q) for a score linear in q
        dscale = jnp.sum(dq_raw * qb.astype(acc))
    dq = _q_unblocks(dq_raw * scale, q.shape[1]).astype(q.dtype)
    dk = _kv_unblocks(dk_raw * scale, k.shape[1]).astype(k.dtype)
    dv = _kv_unblocks(dv, k.shape[1]).astype(v.dtype)
    dparams = jax.tree.map(lambda g, x: (g * scale).astype(x.dtype), dparams, params)
    d_score_consts = [None] * len(score_consts)
    for c, g in zip(diff, dconsts, strict=True):
        d_score_consts[c] = g.astype(jnp.result_type(score_consts[c]))
    dscale = dscale.astype(scale.dtype).reshape(scale.shape)
    nones = jax.tree.map(lambda _: None, (kv_len, q_pos, k_pos, lists, mask_consts))
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return (dq, dk, dv, dscale, dparams, tuple(d_score_consts), *nones, dbias, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(st, q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists, mask_consts,
           bias, seed):  # fmt: skip
    return _forward(st, q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists,
                    mask_consts, bias, seed)  # fmt: skip


def _tiled_fwd(st, q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists, mask_consts,
               bias, seed):  # fmt: skip
    args = (q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists, mask_consts, bias,
            seed)  # fmt: skip
    out, lse = _forward(st, *args)
    return (out, lse), (*args, out, lse)


_tiled.defvjp(_tiled_fwd, _backward)


def _pad_pos(pos, block: int, fill: int):
    pos = jnp.asarray(pos, jnp.int32)
    return jnp.pad(pos, (0, masking.cdiv(pos.shape[0], block) * block - pos.shape[0]),
                   constant_values=fill)  # fmt: skip


def _prepare(q, k, scale, block_mask, score_mod, score, q_pos, k_pos, q_limit, k_limit,
             bias=None, dropout=None):  # fmt: skip
    """Static config, positions, hoisted mods, tile lists, padded bias and seed of one call."""
    b, tq, n, _ = q.shape
    if bias is not None and (q_pos is not None or k_pos is not None):
        raise ValueError("a dense bias needs the default positions (arange of the inputs)")
    tk, kh = k.shape[1], k.shape[2]
    bq, bk = block_mask.block_q, block_mask.block_k
    acc = masking.stat_dtype(q.dtype)
    q_pos = _bm.positions(tq) if q_pos is None else q_pos
    k_pos = _bm.positions(tk) if k_pos is None else k_pos
    q_limit = tq if q_limit is None else q_limit
    k_limit = tk if k_limit is None else k_limit
    q_pos, k_pos = _pad_pos(q_pos, bq, q_limit), _pad_pos(k_pos, bk, k_limit)
    g = n // kh
    bi, hi = _head_index(b, kh, g)
    qi = np.zeros((1, 1, 1, bq, 1), np.int32)
    ki = np.zeros((1, 1, 1, 1, bk), np.int32)
    tile_shape = (b, kh, g, bq, bk)
    mask_fn, mask_consts = None, ()
    if block_mask.mask_mod is not None and not isinstance(block_mask.mask_mod, _mods.Full):
        hm = _bm.hoist("mask_mod", block_mask.mask_mod, bi, hi, qi, ki)
        _bm.check_mask_output(hm.out, tile_shape)
        mask_fn, mask_consts = hm.fn, hm.consts
    score_fn, score_consts = None, ()
    if score_mod is not None:
        hs = _bm.hoist("score_mod", score_mod, jnp.zeros(tile_shape, acc), bi, hi, qi, ki)
        if hs.out.shape != tile_shape or hs.out.dtype != acc:
            raise ValueError(
                f"score_mod must return an array of score's shape and dtype {tile_shape} {acc}; "
                f"it returned {hs.out.shape} {hs.out.dtype}"
            )
        score_fn, score_consts = hs.fn, hs.consts
    bias_qk = (False, False)
    if bias is not None:
        bias = masking.check_bias(bias, b, n, tq, tk)
        bias_qk = (bias.shape[2] > 1, bias.shape[3] > 1)
        pad = [(0, 0), (0, 0)]
        pad += [(0, q_pos.shape[0] - tq) if bias_qk[0] else (0, 0)]
        pad += [(0, k_pos.shape[0] - tk) if bias_qk[1] else (0, 0)]
        bias = jnp.pad(bias, pad)
    rate, shared, seed = 0.0, False, None
    if dropout is not None:
        rate, shared, seed = dropout.rate, dropout.broadcast, dropout.seed
    st = _Static(bq, bk, score, mask_fn, score_fn, int(q_limit), int(k_limit), bias_qk, rate,
                 shared)  # fmt: skip
    lists = tuple(jnp.asarray(x, jnp.int32) for x in _bm.union_lists(block_mask))
    return (st, jnp.asarray(scale, acc), tuple(score_consts), q_pos, k_pos, lists,
            tuple(mask_consts), bias, seed)  # fmt: skip


def tiled_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: Any,
    block_mask: _bm.BlockMask,
    kv_len: jax.Array | None = None,
    score_mod: Any = None,
    score: Score = DOT,
    params: Any = None,
    q_pos: Any = None,
    k_pos: Any = None,
    q_limit: int | None = None,
    k_limit: int | None = None,
    bias: jax.Array | None = None,
    dropout: masking.Dropout | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Differentiable tiled attention over ``block_mask``: ``(out [B,Tq,N,Hv], lse [B,Tq,N])``.

    q: [B, Tq, N, D], k: [B, Tk, K, D], v: [B, Tk, K, Hv] (D: the score's
    input width, H for the dot product); ``block_mask``: tiles and the
    ``mask_mod`` of the partial ones, built at the same positions; kv_len: int
    ``[B]`` or None; ``score_mod(score, b, h, q_idx, kv_idx)``; ``score`` and
    its ``params``. ``q_pos``/``k_pos``: int positions of the rows (default
    ``arange``; ascending), the indices the mods see; positions at or past
    ``q_limit``/``k_limit`` are padding. ``bias``: broadcastable to ``[B, N,
    Tq, Tk]``, added to the scaled logits before ``score_mod`` (default
    positions only). ``dropout``: a :class:`~efficient_attn.core.masking.Dropout`
    of the weights (the normaliser and ``lse`` are those without dropout).
    Differentiable in q, k, v, scale, params, bias, the arrays ``score_mod``
    closes over, and through ``lse``.
    """
    st, scale, sc, q_pos, k_pos, lists, mc, bias, seed = _prepare(
        q, k, scale, block_mask, score_mod, score, q_pos, k_pos, q_limit, k_limit, bias, dropout
    )
    return _tiled(st, q, k, v, scale, params, sc, kv_len, q_pos, k_pos, lists, mc, bias, seed)


def tiled_forward(q, k, v, *, scale, block_mask, kv_len=None, score_mod=None, q_pos=None,
                  k_pos=None, q_limit=None, k_limit=None):  # fmt: skip
    """The forward of :func:`tiled_attention` (dot score), not differentiable: (out, lse)."""
    st, scale, sc, q_pos, k_pos, lists, mc, _, _ = _prepare(
        q, k, scale, block_mask, score_mod, DOT, q_pos, k_pos, q_limit, k_limit
    )
    return _forward(st, q, k, v, scale, None, sc, kv_len, q_pos, k_pos, lists, mc, None, None)


def tiled_backward(q, k, v, out, lse, dout, *, scale, block_mask, kv_len=None, score_mod=None,
                   q_pos=None, k_pos=None, q_limit=None, k_limit=None):  # fmt: skip
    """Gradients of this key set given the *global* ``out``/``lse`` (ring attention).

    Returns ``(dq, dk, dv, dscale, d_score_consts, score_consts)``: the
    cotangents of the arrays ``score_mod`` closes over, beside those arrays
    (the hoisted tracers, for the caller to match with its own inputs).
    """
    st, scale_a, sc, q_pos, k_pos, lists, mc, _, _ = _prepare(
        q, k, scale, block_mask, score_mod, DOT, q_pos, k_pos, q_limit, k_limit
    )
    res = (q, k, v, scale_a, None, sc, kv_len, q_pos, k_pos, lists, mc, None, None, out, lse)
    grads = _backward(st, res, (dout, jnp.zeros(lse.shape, lse.dtype)))
    dq, dk, dv, dscale, _, dsc = grads[:6]
    return dq, dk, dv, dscale, dsc, sc


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


def result(out_lse: tuple[jax.Array, jax.Array], return_lse: bool, dtype: Any):
    """A method's return value from the engine's ``(out, lse)``: ``out`` in ``dtype``, or both."""
    out, lse = out_lse
    return (out.astype(dtype), lse) if return_lse else out.astype(dtype)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # mods holding arrays compare elementwise: treat as different
        return False


def plan_block_mask(
    tq: int,
    tk: int,
    *,
    batch: int,
    heads: int,
    causal: bool,
    mask_mod: Any = None,
    block_mask: _bm.BlockMask | None = None,
    block_q: int,
    block_k: int,
    pattern: Any = None,
) -> _bm.BlockMask:
    """The block mask one call runs over: ``causal``, a method's ``pattern`` and the user's mask.

    With ``block_mask`` (built by the user, reused across layers) the static
    parts (causal, pattern) are ANDed into its classification; otherwise one
    block mask of everything is built, depending on batch and heads only where
    the mods read those indices.
    """
    mods = _mods
    required = [m for m in (mods.causal_bottom_right(tq, tk) if causal else None, pattern) if m]
    if block_mask is not None:
        bm = _bm.check_block_mask(block_mask, tq, tk, batch, heads)
        if mask_mod is not None and not _same(mask_mod, bm.mask_mod):
            raise ValueError(
                "mask_mod differs from the mask_mod block_mask was built from; pass one of them "
                "(or ea.block_mask(mask_mod, ...) of this mask_mod)"
            )
        if required:
            extra = mods.and_masks(*required) if len(required) > 1 else required[0]
            bm = _bm.and_block_masks(bm, _bm.block_mask(extra, tq, tk, block_q=bm.block_q,
                                                        block_k=bm.block_k))  # fmt: skip
        return bm
    parts = [*required, *([mask_mod] if mask_mod is not None else [])]
    mod = mods.full_mask() if not parts else parts[0] if len(parts) == 1 else mods.and_masks(*parts)
    return _bm.build_inferred(mod, tq, tk, batch=batch, heads=heads, block_q=block_q,
                              block_k=block_k)  # fmt: skip


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: Any,
    block_q: int,
    block_k: int,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_mask: _bm.BlockMask | None = None,
    pattern: Any = None,
    score: Score = DOT,
    params: Any = None,
    bias: jax.Array | None = None,
    dropout: masking.Dropout | None = None,
) -> tuple[jax.Array, jax.Array]:
    """What every tiled method runs: its arguments to a block mask, then the engine.

    q: [B, Tq, N, D], k: [B, Tk, K, D], v: [B, Tk, K, Hv] -> ``(out [B, Tq,
    N, Hv], lse [B, Tq, N])``. ``pattern``: the method's own ``mask_mod``
    (sparse methods), ANDed with ``causal`` and the user's ``mask_mod``.
    Tiles of ``block_q x block_k`` (clipped to the lengths) unless
    ``block_mask`` fixes them. This is the XLA engine; the fused Pallas kernels
    are chosen one layer up (:func:`efficient_attn.kernels.attend`).
    """
    b, tq, n = q.shape[:3]
    tk = k.shape[1]
    bm = plan_block_mask(
        tq, tk, batch=b, heads=n, causal=causal, mask_mod=mask_mod, block_mask=block_mask,
        block_q=min(block_q, tq), block_k=min(block_k, tk), pattern=pattern,
    )  # fmt: skip
    kv_len = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    return tiled_attention(
        q, k, v, scale=scale, block_mask=bm, kv_len=kv_len, score_mod=score_mod, score=score,
        params=params, bias=bias, dropout=dropout,
    )  # fmt: skip
