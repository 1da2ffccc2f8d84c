"""The backward of the tile engine (FlashAttention-2, Dao 2023).

Recomputes each tile from the saved ``out``/``lse``: loops over key tiles
and, inside, over the query tiles that visit them (the transposed lists),
accumulating dK/dV per key tile and dQ in one O(N) buffer; also the
cotangents of the scale, the score's params, the bias and the arrays the
``score_mod`` closes over, and of ``lse``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.core import masking
from efficient_attn.core.engine.score import DotScore, rows_matmul, rows_t, t_matmul
from efficient_attn.core.engine.tiling import (
    _head_index,
    _kv_rows,
    _kv_tile,
    _q_blocks,
    _q_unblocks,
    _Static,
    _Tile,
    prescaled,
)


def _floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _swap(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _write_rows(rows: jax.Array, tile: jax.Array, j, block: int) -> jax.Array:
    """``rows [B, T, K, D]`` with key tile ``j`` (``tile [B, K, block, D]``) written in."""
    tile = jnp.swapaxes(tile, 1, 2).astype(rows.dtype)
    return jax.lax.dynamic_update_slice_in_dim(rows, tile, j * block, axis=1)


def _backward(st: _Static, res, cotangents, offset=None):
    """FlashAttention-2 backward from the saved ``out``/``lse``, with the cotangent of ``lse``
    (``offset``: the first example and head of a group, :mod:`.groups`)."""
    (q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists, mask_consts, bias, seed,
     out, lse) = res  # fmt: skip
    dout, dlse = cotangents
    acc = masking.stat_dtype(q.dtype)
    b, _, n, _ = q.shape
    kh = k.shape[2]
    idx = _head_index(b, kh, n // kh, offset)
    q_s, folded = prescaled(st, q, scale)
    qb = _q_blocks(q_s, kh, st.bq)
    dob = _q_blocks(jnp.asarray(dout).astype(q.dtype), kh, st.bq)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows that see nothing: p = 0
    lseb = _q_blocks(lse, kh, st.bq, fill=jnp.inf)  # [nq, B, K, G, bq]; pad rows: p = 0
    # d lse / d s = p, so the lse cotangent enters as ds = p * (dp - (delta - dlse)).
    delta = jnp.sum(out.astype(acc) * jnp.asarray(dout).astype(acc), axis=-1)
    delta = _q_blocks(delta - jnp.asarray(dlse, acc), kh, st.bq)  # [nq, B, K, G, bq]
    kr, vr = _kv_rows(k, st.bk), _kv_rows(v, st.bk)  # key tiles sliced one at a time
    # dK and dV accumulate transposed, dK^T += Q_i^T dS and dV^T += dO_i^T P, from Q and dO
    # transposed once here: a matmul of row-major operands, where dS^T Q (the transposed
    # left operand) runs at about half the speed on XLA's CPU backend (the engine's report).
    dot = isinstance(st.score, DotScore)
    qbt = rows_t(qb) if dot else None  # [nq, B, K, H, G*bq]
    dobt = rows_t(dob)  # [nq, B, K, Hv, G*bq]
    k_first = k_pos[:: st.bk]
    max_len = None if kv_len is None else jnp.max(kv_len)
    diff = [i for i, c in enumerate(score_consts) if _floating(c)]
    part_num, part_idx, full_num, full_idx = lists[4:]

    def kv_tile(carry, args):
        j, p_num, p_idx, f_num, f_idx = args
        k_j, v_j = _kv_tile(kr, j, st.bk), _kv_tile(vr, j, st.bk)  # [B, K, bk, H]

        def run(partial, lst):
            def body(t, carry):
                dk, dv, dq, dparams, dconsts, dscale, dbias = carry
                i = lst[t]
                q_i, do_i = qb[i], dob[i]
                tile = _Tile(st, idx, q_pos, k_pos, i, j, kv_len, mask_consts, score_consts)
                k_jj = tile.values(k_j)  # padding keys may hold NaN: they never reach dq
                raw = st.score.logits(params, q_i, k_jj, acc)
                s = raw if folded else raw * scale
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
                dv = dv + t_matmul(dobt[i], drop(p).astype(v.dtype), acc)
                dp = rows_matmul("bkqd,bksd->bkqs", do_i, vv, acc)
                ds = p * (drop(dp) - delta[i][..., None])
                if mask is not None:
                    ds = jnp.where(mask, ds, 0.0)
                if st.score_fn is not None:
                    ds, *dc = mod_vjp(ds)
                    dconsts = tuple(a + g.astype(a.dtype) for a, g in zip(dconsts, dc, strict=True))
                if bias is not None:
                    dbias = tile.add_bias_grad(dbias, ds)
                if dot:  # dk_j transposed: [B, K, H, bk]
                    (dq_i, dk_j), dparams_ij = st.score.vjp_t(qbt[i], k_jj, ds, acc), None
                else:
                    dq_i, dk_j, dparams_ij = st.score.vjp(params, q_i, k_jj, ds, acc)
                if not st.score.linear_in_q:
                    dscale = dscale + jnp.sum(ds * raw)
                dparams = jax.tree.map(jnp.add, dparams, dparams_ij)
                return dk + dk_j, dv, dq.at[i].add(dq_i), dparams, dconsts, dscale, dbias

            return body

        dq, dparams, dconsts, dscale, dbias, dk_all, dv_all = carry
        dk0 = jnp.zeros(_swap(k_j).shape if dot else k_j.shape, acc)
        inner = (dk0, jnp.zeros(_swap(v_j).shape, acc), dq, dparams, dconsts, dscale, dbias)
        skip = None if max_len is None else k_first[j] >= max_len
        for partial, num, lst in ((True, p_num, p_idx), (False, f_num, f_idx)):
            count = num if skip is None else jnp.where(skip, 0, num)
            inner = jax.lax.fori_loop(0, count, run(partial, lst), inner)
        dk, dv, dq, dparams, dconsts, dscale, dbias = inner
        dk = _swap(dk) if dot else dk  # [B, K, bk, H]
        dk = dk if folded else dk * scale
        # Each key tile's gradients are final here: written once, in the inputs' layout.
        dk_all = _write_rows(dk_all, dk, j, st.bk)
        dv_all = _write_rows(dv_all, _swap(dv), j, st.bk)
        return (dq, dparams, dconsts, dscale, dbias, dk_all, dv_all), None

    dparams0 = jax.tree.map(lambda x: jnp.zeros(x.shape, acc), params)
    dconsts0 = tuple(jnp.zeros(jnp.shape(score_consts[c]), acc) for c in diff)
    dbias0 = None if bias is None else jnp.zeros(bias.shape, acc)
    init = (jnp.zeros(qb.shape, acc), dparams0, dconsts0, jnp.zeros((), acc), dbias0,
            jnp.zeros(kr.shape, k.dtype), jnp.zeros(vr.shape, v.dtype))  # fmt: skip
    nk = kr.shape[1] // st.bk
    xs = (jnp.arange(nk), *(jnp.asarray(x) for x in (part_num, part_idx, full_num, full_idx)))
    (dq_raw, dparams, dconsts, dscale, dbias, dk, dv), _ = jax.lax.scan(kv_tile, init, xs)
    if st.score.linear_in_q:  # sum(dS * score) = sum(dQ_raw * Q) for a score linear in q
        q_blocks = _q_blocks(q, kh, st.bq) if folded else qb  # the unscaled queries
        dscale = jnp.sum(dq_raw * q_blocks.astype(acc))
    dq = _q_unblocks(dq_raw * scale, q.shape[1]).astype(q.dtype)
    dk, dv = dk[:, : k.shape[1]], dv[:, : k.shape[1]]
    dparams = jax.tree.map(lambda g, x: (g * scale).astype(x.dtype), dparams, params)
    d_score_consts = [None] * len(score_consts)
    for c, g in zip(diff, dconsts, strict=True):
        d_score_consts[c] = g.astype(jnp.result_type(score_consts[c]))
    dscale = dscale.astype(scale.dtype).reshape(scale.shape)
    nones = jax.tree.map(lambda _: None, (kv_len, q_pos, k_pos, lists, mask_consts))
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return (dq, dk, dv, dscale, dparams, tuple(d_score_consts), *nones, dbias, None)
