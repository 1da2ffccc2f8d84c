"""Building block masks: :func:`block_mask`, :func:`build` at explicit positions, the cache.

Masks over indices only are classified once at trace time and cached as NumPy
arrays (constants of the program); masks over data are built on device inside
``jit``, so new values never retrace or recompile.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from efficient_attn.core import masking
from efficient_attn.core.blockmask.classify import (
    _bounded_static,
    _classify_data,
    _evaluate_static,
    _index_args,
)
from efficient_attn.core.blockmask.hoist import check_mask_output, hoist
from efficient_attn.core.blockmask.mask import EMPTY, FULL, PARTIAL, BlockMask
from efficient_attn.core.mods.base import and_masks

_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 128


def _check_int(name: str, value: Any) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return int(value)


def _dims(name: str, given: int | None, uses: bool, what: str, letter: str) -> int:
    if given is None:
        if uses:
            raise ValueError(
                f"mask_mod reads its {what} index {letter!r} but {name}=None says it does not "
                f"depend on it; pass {name}=<the {what} size>"
            )
        return 1
    return _check_int(name, given)


def build(
    mask_mod: Callable[..., Any],
    q_pos: Any,
    k_pos: Any,
    *,
    q_limit: int,
    k_limit: int,
    batch: int | None,
    heads: int | None,
    block_q: int,
    block_k: int,
    infer: bool = False,
) -> BlockMask:
    """Block mask of ``mask_mod`` at explicit query/key positions (ring shards, gathered keys).

    ``q_pos [Tq]``, ``k_pos [Tk]``: int positions, ascending; positions at or
    past ``q_limit``/``k_limit`` are padding (never visible). NumPy positions
    and a mod over indices only give a cached NumPy block mask. With
    ``infer``, ``batch``/``heads`` are the sizes and the mask depends on them
    only where the mod reads those indices.
    """
    if infer:
        uses = hoist("mask_mod", mask_mod, *_index_args(batch, heads, 1, 1)).uses
        batch, heads = (batch if uses[0] else None), (heads if uses[1] else None)
    bq, bk = _check_int("block_q", block_q), _check_int("block_k", block_k)
    static_pos = isinstance(q_pos, np.ndarray) and isinstance(k_pos, np.ndarray)
    tq, tk = q_pos.shape[0], k_pos.shape[0]
    nq, nk = masking.cdiv(tq, bq), masking.cdiv(tk, bk)
    xp = np if static_pos else jnp
    q_pos = xp.concatenate([xp.asarray(q_pos, np.int32), xp.full(nq * bq - tq, q_limit, np.int32)])
    k_pos = xp.concatenate([xp.asarray(k_pos, np.int32), xp.full(nk * bk - tk, k_limit, np.int32)])
    probe = _index_args(batch or 1, heads or 1, bq, nk * bk)
    h = hoist("mask_mod", mask_mod, *probe)
    check_mask_output(h.out, np.broadcast_shapes(*(p.shape for p in probe)))
    bm = _dims("batch", batch, h.uses[0], "batch", "b")
    hm = _dims("heads", heads, h.uses[1], "head", "h")
    if not (h.static and static_pos):
        tiles, visible = _classify_data(mask_mod, h.fn, h.consts, q_pos, k_pos, q_limit, k_limit,
                                        bm, hm, bq, bk)  # fmt: skip
        return BlockMask.from_tiles(tiles, visible, mask_mod, tq, tk, bq, bk)
    key = (mask_mod, q_pos.tobytes(), k_pos.tobytes(), q_limit, k_limit, bm, hm, bq, bk)
    try:
        hit = _CACHE.get(key)
    except TypeError:  # an unhashable mod (holding concrete arrays): no caching
        key, hit = None, None
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    bounded = None
    if not (h.uses[0] or h.uses[1]):
        bounded = _bounded_static(mask_mod, q_pos, k_pos, q_limit, k_limit, bq, bk)
    if bounded is not None:
        tiles, visible = (np.broadcast_to(x, (bm, hm, *x.shape[2:])).copy() for x in bounded)
    else:
        tiles, visible = _evaluate_static(mask_mod, h.fn, q_pos, k_pos, q_limit, k_limit, bm, hm,
                                          bq, bk)  # fmt: skip
    made = BlockMask.from_tiles(tiles, visible, mask_mod, tq, tk, bq, bk)
    if key is not None:
        _CACHE[key] = made
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return made


def block_mask(
    mask_mod: Callable[..., Any],
    q_len: int,
    kv_len: int,
    *,
    batch: int | None = None,
    heads: int | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> BlockMask:
    """Classify every ``block_q x block_k`` tile of ``mask_mod`` as empty, partial or full.

    Args:
      mask_mod: ``(b, h, q_idx, kv_idx) -> bool`` (see :mod:`efficient_attn.core.mods`).
      q_len, kv_len: sequence lengths.
      batch, heads: sizes of the batch and query-head dimensions the mask
        depends on; None: it does not (a ``ValueError`` if it reads them).
      block_q, block_k: tile sizes; the tile engine runs with these tiles.

    Returns:
      a :class:`BlockMask`: NumPy and cached when the mod depends only on
      indices, built on device (inside ``jit``: no retracing for new data) when
      it closes over traced arrays.
    """
    q_len, kv_len = _check_int("q_len", q_len), _check_int("kv_len", kv_len)
    return build(
        mask_mod, np.arange(q_len, dtype=np.int32), np.arange(kv_len, dtype=np.int32),
        q_limit=q_len, k_limit=kv_len, batch=batch, heads=heads,
        block_q=min(_check_int("block_q", block_q), q_len),
        block_k=min(_check_int("block_k", block_k), kv_len),
    )  # fmt: skip


def and_block_masks(a: BlockMask, b: BlockMask) -> BlockMask:
    """The block mask of ``a.mask_mod & b.mask_mod`` from the two classifications.

    Exact for empty tiles (empty if either is) and full tiles (full if both
    are); everything else is partial. ``visible`` is an upper bound.
    """
    same = (a.q_len, a.kv_len, a.block_q, a.block_k) == (b.q_len, b.kv_len, b.block_q, b.block_k)
    if not same:
        raise ValueError(f"block masks disagree: {a!r} vs {b!r} (lengths and blocks must be equal)")
    xp = np if a.static and b.static else jnp
    ta, tb = xp.asarray(a.tiles), xp.asarray(b.tiles)
    tiles = xp.where(
        (ta == EMPTY) | (tb == EMPTY), EMPTY, xp.where((ta == FULL) & (tb == FULL), FULL, PARTIAL)
    )
    visible = xp.minimum(xp.asarray(a.visible), xp.asarray(b.visible))
    visible = xp.where(tiles == EMPTY, 0, visible)
    mod = and_masks(a.mask_mod, b.mask_mod)
    return BlockMask.from_tiles(
        tiles.astype(np.int8), visible, mod, a.q_len, a.kv_len, a.block_q, a.block_k
    )


def positions(length: int) -> np.ndarray:
    return np.arange(length, dtype=np.int32)


def build_inferred(
    mask_mod: Callable[..., Any], q_len: int, kv_len: int, *, batch: int, heads: int,
    block_q: int, block_k: int,
) -> BlockMask:  # fmt: skip
    """:func:`block_mask` depending on batch and heads only where ``mask_mod`` reads them."""
    q_len, kv_len = _check_int("q_len", q_len), _check_int("kv_len", kv_len)
    return build(
        mask_mod, positions(q_len), positions(kv_len), q_limit=q_len, k_limit=kv_len,
        batch=batch, heads=heads, block_q=min(_check_int("block_q", block_q), q_len),
        block_k=min(_check_int("block_k", block_k), kv_len), infer=True,
    )  # fmt: skip
