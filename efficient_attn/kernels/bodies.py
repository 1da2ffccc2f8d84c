"""Kernel bodies shared by the Pallas backends: forward, dK/dV and dQ over tile lists.

FlashAttention-2 (Dao 2023) over a FlexAttention block mask (Dong et al. 2024):
each program owns one tile of outputs and loops over the key (or query) tiles
its list names, first the partial tiles (``mask_mod`` evaluated in the tile),
then the full ones (no in-tile mask). Statistics are float32. A dense bias is
added to the scaled logits before the ``score_mod``; dropout (inverted,
counter-based) drops weights after the softmax, whose normaliser and ``lse`` are
those of the undropped weights; the backward redraws each tile's mask.

Refs: the scalars first (counts ``[B * Hm, R]`` and lists ``[Bm * Hm * R, W]``, partial
then full: each program reads the lists of its own ``(b, h)`` where the block mask
differs per example or head, :func:`~efficient_attn.kernels.common.list_rows`;
``kv_len [B]`` and the dropout seed ``[2]`` if any; SMEM on TPU), then the
tensors (see each kernel), a traced scale, the bias block, the mods' arrays
(:func:`~efficient_attn.kernels.common.roles`), and the outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from efficient_attn.kernels import common, layouts
from efficient_attn.kernels.common import Spec, TileCtx, aligned, dot, key_rows, rows_ok

# ---- forward -------------------------------------------------------------------------


def _bias_of_query_tile(spec: Spec, ref, j):
    """The tile's bias ``[bq|1, bk|1]`` from a query tile's block ``[bq|1, Tk_pad|1]``."""
    return None if ref is None else layouts.row_slab_tile(spec, spec.bias, ref, j)


def forward_kernel(spec: Spec, ids, p_cnt, p_idx, f_cnt, f_idx, *refs):
    """Out ``[bq, Hv]`` and lse ``[bq, 1]`` of one query tile of one head.

    Tensors: q ``[bq, H]``, k ``[Tk_pad, H]``, v ``[Tk_pad, Hv]``; outputs o ``[bq, Hv]``,
    lse ``[bq, 1]``.
    """
    i, b, h = ids()
    kv_len, seed, refs = common.prologue(spec, b, refs)
    q_ref, k_ref, v_ref, *refs = refs
    bias_ref, ins, (o_ref, lse_ref) = common.split_refs(spec, refs)
    q = q_ref[...]
    bq = spec.bq
    crow, base = common.list_rows(spec, p_cnt, b, h)

    def run(partial, cnt, idx):
        def body(t, carry):
            o, m, l = carry
            j = idx[common.at(base, i), t]
            tile = TileCtx(spec, b, h, i, j, kv_len, ins, seed)
            rows = rows_ok(kv_len, j, spec.bk)
            s = tile.logits(
                q, key_rows(k_ref, j, spec.bk, rows), _bias_of_query_tile(spec, bias_ref, j)
            )
            mask = tile.mask(partial)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe)
            alpha = jnp.exp(m - m_safe)
            v = key_rows(v_ref, j, spec.bk, rows)
            pv = dot(tile.dropout()(p).astype(v.dtype), v, spec)
            return o * alpha + pv, m_new, l * alpha + p.sum(axis=-1, keepdims=True)

        return lambda carry: jax.lax.fori_loop(0, cnt[crow, i], body, carry)

    carry = (
        jnp.zeros((bq, o_ref.shape[-1]), jnp.float32),
        jnp.full((bq, 1), -jnp.inf, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    carry = run(True, p_cnt, p_idx)(carry)
    o, m, l = run(False, f_cnt, f_idx)(carry)
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (o / safe_l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


# ---- backward ------------------------------------------------------------------------


def _tile_grads(spec: Spec, tile: TileCtx, partial, q, k, v, do, lse, delta, bias):
    """``(drop(p), ds)`` of one tile: the (dropped) weights and the cotangent of the logits
    before the scale (of the bias too); the score_mod's array gradients are added here."""
    raw = tile.raw(q, k, bias)
    keys = []
    if tile.score_mod is None:
        s, mod_vjp = raw, None
    else:
        reader = tile.score_mod
        keys = reader.record(raw, *tile.index)

        def modded(s, *values):
            return reader.replay(keys, values, s, *tile.index)

        s, mod_vjp = jax.vjp(modded, raw, *reader.recorded(keys))
    p = jnp.exp(s - lse)
    mask = tile.mask(partial)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    drop = tile.dropout()  # one mask for p and dp
    dp = dot(do, v, spec, trans_b=True)
    ds = p * (drop(dp) - delta)
    if mask is not None:
        ds = jnp.where(mask, ds, 0.0)
    if mod_vjp is not None:
        ds, *cots = mod_vjp(ds)
        if mask is not None:
            ds = jnp.where(mask, ds, 0.0)
        if keys:
            tile.score_mod.add_grads(keys, cots)
    return drop(p), ds


def _group_rows(ref, g, start, n: int, heads_first: bool):
    """Rows ``[start, start + n)`` of query head ``g`` of a grouped ref."""
    start = aligned(start, n)
    return ref[g, pl.ds(start, n), :] if heads_first else ref[pl.ds(start, n), g, :]


def _zero_dbias(spec: Spec, ref) -> None:
    """Zero a dK/dV program's bias-gradient block ``[Gb, Tq_pad|1, bk]`` tile by tile
    (Triton's shapes must be powers of two)."""
    gb, rows = ref.shape[0], ref.shape[1]
    step = spec.bq if spec.bias[2] else 1

    def body(t, _):
        g, r = jax.lax.div(t, rows // step), jax.lax.rem(t, rows // step)
        ref[g, pl.ds(aligned(r * step, step), step), :] = jnp.zeros((step, ref.shape[2]),
                                                                    ref.dtype)  # fmt: skip
        return 0

    jax.lax.fori_loop(0, gb * (rows // step), body, 0)


def dkdv_kernel(spec: Spec, ids, p_cnt, p_idx, f_cnt, f_idx, *refs):
    """dK, dV ``[bk, H]`` of one key tile of one K/V head, over the query tiles that visit it.

    Tensors: k and v tiles ``[bk, H]``, q and dO of the K/V head's G query heads
    (``[G, Tq_pad, H]`` or ``[Tq_pad, G, H]``), lse and delta ``[G, Tq_pad, 1]``;
    outputs dk, dv ``[bk, H]``, then the bias gradient ``[Gb, Tq_pad|1, bk]`` (if the
    bias varies along keys) and the score_mod arrays' gradient buffers.
    """
    j, b, kh = ids()
    kv_len, seed, refs = common.prologue(spec, b, refs)
    k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs = refs
    bias_ref, ins, outs = common.split_refs(spec, refs, grads=True)
    dk_ref, dv_ref, *outs = outs
    dbias_ref = outs.pop(0) if spec.bias_dkdv else None
    grads = dict(zip(spec.grads_of_score(), outs, strict=True))
    ins.score_grads = grads
    for n, ref in grads.items():
        if spec.score.layouts[n].grad != "atomic":
            common.zero_fill(ref, spec.score.layouts[n])
    if dbias_ref is not None:
        _zero_dbias(spec, dbias_ref)
    rows = rows_ok(kv_len, j, spec.bk)
    k = key_rows(k_ref, 0, spec.bk, rows)
    v = key_rows(v_ref, 0, spec.bk, rows)
    bq, hf = spec.bq, spec.heads_first

    def bias_of(g, i):
        return None if bias_ref is None else layouts.column_slab_tile(spec, spec.bias, bias_ref,
                                                                       g, i)  # fmt: skip

    crow, base = common.list_rows(spec, p_cnt, b, kh, kv_heads=True)
    # a per-head mask under GQA lists (query tile, query head) pairs ``i * G + g``; else the
    # query tiles, each run for the G query heads
    per = 1 if spec.pairs else spec.groups

    def run(partial, cnt, idx):
        def body(t, carry):
            dk, dv = carry
            if spec.pairs:
                e = idx[common.at(base, j), t]
                i, g = jax.lax.div(e, spec.groups), jax.lax.rem(e, spec.groups)
            else:
                i = idx[common.at(base, j), jax.lax.div(t, spec.groups)]  # t >= 0: lax's rules
                g = jax.lax.rem(t, spec.groups)
            tile = TileCtx(spec, b, kh * spec.groups + g, i, j, kv_len, ins, seed)
            q = _group_rows(q_ref, g, i * bq, bq, hf)
            do = _group_rows(do_ref, g, i * bq, bq, hf)
            lse = lse_ref[g, pl.ds(aligned(i * bq, bq), bq), :]
            delta = delta_ref[g, pl.ds(aligned(i * bq, bq), bq), :]
            p, ds = _tile_grads(spec, tile, partial, q, k, v, do, lse, delta, bias_of(g, i))
            if dbias_ref is not None:
                layouts.add_to_column_slab(spec, spec.bias, dbias_ref, g, i, ds)
            dv = dv + dot(p.astype(do.dtype), do, spec, trans_a=True)
            dk = dk + dot(ds.astype(q.dtype), q, spec, trans_a=True)
            return dk, dv

        return lambda carry: jax.lax.fori_loop(0, cnt[crow, j] * per, body, carry)

    carry = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    carry = run(True, p_cnt, p_idx)(carry)
    dk, dv = run(False, f_cnt, f_idx)(carry)
    dk_ref[...] = (dk * ins.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def dq_kernel(spec: Spec, ids, p_cnt, p_idx, f_cnt, f_idx, *refs):
    """dQ ``[bq, H]`` of one query tile of one head, over its forward tile lists.

    Tensors: as :func:`forward_kernel`, then dO ``[bq, Hv]``, lse and delta ``[bq, 1]``;
    outputs dq ``[bq, H]``, then the bias gradient's row sums ``[bq, 1]`` (if the bias is
    constant along keys) and the scale gradient's row sums ``[bq, 1]`` (a traced scale).
    """
    i, b, h = ids()
    kv_len, seed, refs = common.prologue(spec, b, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
    bias_ref, ins, outs = common.split_refs(spec, refs)
    dq_ref, *outs = outs
    dscale_ref = outs.pop() if spec.scale is None else None
    dbias_ref = outs[0] if outs else None
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    crow, base = common.list_rows(spec, p_cnt, b, h)

    def run(partial, cnt, idx):
        def body(t, carry):
            dq, db = carry
            j = idx[common.at(base, i), t]
            tile = TileCtx(spec, b, h, i, j, kv_len, ins, seed)
            rows = rows_ok(kv_len, j, spec.bk)
            k = key_rows(k_ref, j, spec.bk, rows)
            v = key_rows(v_ref, j, spec.bk, rows)
            bias = _bias_of_query_tile(spec, bias_ref, j)
            _, ds = _tile_grads(spec, tile, partial, q, k, v, do, lse, delta, bias)
            if dbias_ref is not None:
                db = db + jnp.sum(ds, axis=1, keepdims=True)
            return dq + dot(ds.astype(k.dtype), k, spec), db

        return lambda carry: jax.lax.fori_loop(0, cnt[crow, i], body, carry)

    carry = (jnp.zeros(dq_ref.shape, jnp.float32), jnp.zeros((spec.bq, 1), jnp.float32))
    carry = run(True, p_cnt, p_idx)(carry)
    dq, db = run(False, f_cnt, f_idx)(carry)
    dq_ref[...] = (dq * ins.scale).astype(dq_ref.dtype)
    if dbias_ref is not None:
        dbias_ref[...] = db
    if dscale_ref is not None:  # d scale = sum(ds * q k^T) = sum(q * dq / scale), per row
        dscale_ref[...] = jnp.sum(dq * q.astype(jnp.float32), axis=1, keepdims=True)
