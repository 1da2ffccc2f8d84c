"""The differentiable tiled attention: the ``custom_vjp`` tying the forward and the
backward, the preparation of one call (positions, hoisted mods, tile lists,
bias, dropout) and the ring entry points (partial results merge with
:func:`efficient_attn.core.merge.merge_attention`).

Dao 2023, "FlashAttention-2"; Dong et al. 2024, "FlexAttention" (the arrays
a mod closes over are hoisted into explicit arguments, so gradients reach them).
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
from efficient_attn.core.engine.groups import own_lists, run_backward, run_forward
from efficient_attn.core.engine.score import DOT, Score
from efficient_attn.core.engine.tiling import _head_index, _Static


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(st, q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists, mask_consts,
           bias, seed):  # fmt: skip
    return run_forward(st, q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists,
                       mask_consts, bias, seed)  # fmt: skip


def _tiled_fwd(st, q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists, mask_consts,
               bias, seed):  # fmt: skip
    args = (q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists, mask_consts, bias,
            seed)  # fmt: skip
    out, lse = run_forward(st, *args)
    return (out, lse), (*args, out, lse)


_tiled.defvjp(_tiled_fwd, run_backward)


_LISTS = ("kv_num", "kv_indices", "full_kv_num", "full_kv_indices", "q_num", "q_indices",
          "full_q_num", "full_q_indices")  # fmt: skip


def _pad_pos(pos, block: int, fill: int):
    pos = jnp.asarray(pos, jnp.int32)
    return jnp.pad(pos, (0, masking.cdiv(pos.shape[0], block) * block - pos.shape[0]),
                   constant_values=fill)  # fmt: skip


def _hoist_mods(mask_mod, score_mod, dims, tiles, acc):
    """``(mask_fn, mask_consts, score_fn, score_consts)``: the mods traced at one tile shape."""
    bi, hi = _head_index(*dims)
    qi = np.zeros((1, 1, 1, tiles[0], 1), np.int32)
    ki = np.zeros((1, 1, 1, 1, tiles[1]), np.int32)
    tile_shape = (*dims, *tiles)
    mask_fn, mask_consts = None, ()
    if mask_mod is not None and not isinstance(mask_mod, _mods.Full):
        hm = _bm.hoist("mask_mod", mask_mod, bi, hi, qi, ki)
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
    return mask_fn, tuple(mask_consts), score_fn, tuple(score_consts)


def _same_arrays(a, b) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _prepare(q, k, scale, block_mask, score_mod, score, q_pos, k_pos, q_limit, k_limit,
             bias=None, dropout=None, bwd_block_mask=None):  # fmt: skip
    """Static config, positions, hoisted mods, tile lists, padded bias and seed of one call
    (``bwd_block_mask``: the same mask at the backward's own tiles, or None)."""
    b, tq, n, _ = q.shape
    if bias is not None and (q_pos is not None or k_pos is not None):
        raise ValueError("a dense bias needs the default positions (arange of the inputs)")
    tk, kh = k.shape[1], k.shape[2]
    bq, bk = block_mask.block_q, block_mask.block_k
    acc = masking.stat_dtype(q.dtype)
    g = n // kh
    groups = tuple(block_mask.tiles.shape[:2]) if own_lists(block_mask) else (1, 1)
    if bwd_block_mask is not None and (groups != (1, 1) or own_lists(bwd_block_mask)):
        bwd_block_mask = None  # per-(b, h) lists run one tiling (groups.py)
    pad_q, pad_k = bq, bk
    if bwd_block_mask is not None:  # positions padded for both tilings (powers of two)
        pad_q = max(bq, bwd_block_mask.block_q)
        pad_k = max(bk, bwd_block_mask.block_k)
    q_pos = _bm.positions(tq) if q_pos is None else q_pos
    k_pos = _bm.positions(tk) if k_pos is None else k_pos
    q_limit = tq if q_limit is None else q_limit
    k_limit = tk if k_limit is None else k_limit
    q_pos, k_pos = _pad_pos(q_pos, pad_q, q_limit), _pad_pos(k_pos, pad_k, k_limit)
    dims = (b, kh, g)  # the mods are traced at the shapes of a group's tiles
    if groups != (1, 1):  # each (b mod Bm, h mod Hm) runs its own lists (groups.py)
        _bm.check_block_mask(block_mask, tq, tk, b, n)
        dims = (1 if groups[0] > 1 else b, *((1, 1) if groups[1] > 1 else (kh, g)))
    mask_fn, mask_consts, score_fn, score_consts = _hoist_mods(
        block_mask.mask_mod, score_mod, dims, (bq, bk), acc
    )
    bwd = None
    if bwd_block_mask is not None:
        tiles_b = (bwd_block_mask.block_q, bwd_block_mask.block_k)
        mask_b, mc_b, score_b, sc_b = _hoist_mods(
            bwd_block_mask.mask_mod, score_mod, dims, tiles_b, acc
        )
        if _same_arrays(mc_b, mask_consts) and _same_arrays(sc_b, score_consts):
            bwd = (tiles_b, mask_b, score_b)
        else:  # the mods' arrays came back otherwise: one tiling for both passes
            bwd_block_mask = None
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
    if groups == (1, 1):
        lists = _bm.union_lists(block_mask)  # the shared lists, [R(, W)]
        if bwd_block_mask is not None:  # the backward's transposed lists at its tiles
            lists = (*lists[:4], *_bm.union_lists(bwd_block_mask)[4:])
    else:
        lists = tuple(getattr(block_mask, name) for name in _LISTS)
    st = _Static(bq, bk, score, mask_fn, score_fn, int(q_limit), int(k_limit), bias_qk, rate,
                 shared, groups)  # fmt: skip
    if bwd is not None:
        (bq_b, bk_b), mask_b, score_b = bwd
        st = dataclasses.replace(st, bwd=dataclasses.replace(
            st, bq=bq_b, bk=bk_b, mask_fn=mask_b, score_fn=score_b))  # fmt: skip
    lists = tuple(jnp.asarray(x, jnp.int32) for x in lists)
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
    bwd_block_mask: _bm.BlockMask | None = None,
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
    closes over, and through ``lse``. ``bwd_block_mask``: the same mask at other tiles,
    which the backward runs (shared tile lists only; None: ``block_mask``'s).
    """
    st, scale, sc, q_pos, k_pos, lists, mc, bias, seed = _prepare(
        q,
        k,
        scale,
        block_mask,
        score_mod,
        score,
        q_pos,
        k_pos,
        q_limit,
        k_limit,
        bias,
        dropout,
        bwd_block_mask,
    )
    return _tiled(st, q, k, v, scale, params, sc, kv_len, q_pos, k_pos, lists, mc, bias, seed)


def tiled_forward(q, k, v, *, scale, block_mask, kv_len=None, score_mod=None, q_pos=None,
                  k_pos=None, q_limit=None, k_limit=None):  # fmt: skip
    """The forward of :func:`tiled_attention` (dot score), not differentiable: (out, lse)."""
    st, scale, sc, q_pos, k_pos, lists, mc, _, _ = _prepare(
        q, k, scale, block_mask, score_mod, DOT, q_pos, k_pos, q_limit, k_limit
    )
    return run_forward(st, q, k, v, scale, None, sc, kv_len, q_pos, k_pos, lists, mc, None, None)


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
    grads = run_backward(st, res, (dout, jnp.zeros(lse.shape, lse.dtype)))
    dq, dk, dv, dscale, _, dsc = grads[:6]
    return dq, dk, dv, dscale, dsc, sc


def result(out_lse: tuple[jax.Array, jax.Array], return_lse: bool, dtype: Any):
    """A method's return value from the engine's ``(out, lse)``: ``out`` in ``dtype``, or both."""
    out, lse = out_lse
    return (out.astype(dtype), lse) if return_lse else out.astype(dtype)
