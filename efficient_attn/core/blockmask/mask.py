"""The :class:`BlockMask` pytree: tile classes of a ``mask_mod`` and the tile lists the engine runs.

FlexAttention's ``BlockMask`` (Dong et al. 2024) and splash attention's
``MaskInfo``: per tile, empty (0), partial (1) or full (2), with the partial
and full tiles of each query tile (and their transpose, for the backward pass)
as index lists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core.blockmask.inspection import render_block_mask
from efficient_attn.core.mods.base import Mask

EMPTY, PARTIAL, FULL = 0, 1, 2


def _lists(sel, xp, trim: bool):
    """``sel [..., R, C]`` bool -> (counts [..., R] int32, indices [..., R, W] int32, ascending)."""
    counts = sel.sum(-1).astype(np.int32)
    if xp is np:
        order = np.argsort(~sel, axis=-1, kind="stable").astype(np.int32)
        if trim:
            order = order[..., : max(int(counts.max(initial=0)), 1)]
    else:
        order = jnp.argsort(~sel, axis=-1, stable=True).astype(jnp.int32)
    return counts, order


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
    """Tile classification of a ``mask_mod`` over a ``[q_len, kv_len]`` score matrix.

    Attributes:
      q_len, kv_len: sequence lengths; ``block_q``, ``block_k``: tile sizes.
      tiles: int8 ``[Bm, Hm, nq, nk]``: 0 empty, 1 partial, 2 full. ``Bm`` is
        1 when the mask does not depend on the batch index, else B (``Hm``
        likewise for the query head).
      visible: int32 ``[Bm, Hm, nq, nk]``: visible pairs in each tile.
      kv_num, kv_indices: ``[Bm, Hm, nq]`` and ``[Bm, Hm, nq, W]``: the partial
        key tiles of each query tile, ascending (FlexAttention's
        ``kv_num_blocks``/``kv_indices``); ``full_kv_num``/``full_kv_indices``:
        the full ones.
      q_num, q_indices, full_q_num, full_q_indices: the transpose (query tiles
        of each key tile), for the backward pass.
      mask_mod: the mask the partial tiles evaluate.

    A pytree: it can be passed into and returned from ``jax.jit``. Built by
    :func:`block_mask`; reuse one across layers.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    tiles: Any
    visible: Any
    kv_num: Any
    kv_indices: Any
    full_kv_num: Any
    full_kv_indices: Any
    q_num: Any
    q_indices: Any
    full_q_num: Any
    full_q_indices: Any
    mask_mod: Any

    _ARRAYS = (
        "tiles", "visible", "kv_num", "kv_indices", "full_kv_num", "full_kv_indices",
        "q_num", "q_indices", "full_q_num", "full_q_indices",
    )  # fmt: skip

    @classmethod
    def from_tiles(cls, tiles, visible, mask_mod, q_len, kv_len, bq, bk) -> BlockMask:
        xp = _xp(tiles)
        static = xp is np
        kv = _lists(tiles == PARTIAL, xp, static)
        full_kv = _lists(tiles == FULL, xp, static)
        t = xp.swapaxes(tiles, -1, -2)
        q = _lists(t == PARTIAL, xp, static)
        full_q = _lists(t == FULL, xp, static)
        return cls(q_len, kv_len, bq, bk, tiles, visible, *kv, *full_kv, *q, *full_q, mask_mod)

    @property
    def static(self) -> bool:
        """True when the classification is NumPy (known at trace time)."""
        return isinstance(self.tiles, np.ndarray)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(Bm, Hm, nq, nk)``."""
        return tuple(self.tiles.shape)

    @property
    def density(self) -> float:
        """Fraction of tiles the engine computes (partial or full)."""
        return float(np.mean(np.asarray(self.tiles) != EMPTY))

    @property
    def pair_density(self) -> float:
        """Fraction of the ``q_len * kv_len`` pairs that are visible."""
        bm, hm = self.tiles.shape[:2]
        return float(
            np.asarray(self.visible, np.float64).sum() / (bm * hm * self.q_len * self.kv_len)
        )

    @property
    def computed_pairs(self) -> int:
        """Pairs the engine computes: visited tiles times the tile area (per Bm, Hm)."""
        return int((np.asarray(self.tiles) != EMPTY).sum()) * self.block_q * self.block_k

    def dense(self) -> np.ndarray:
        """Bool ``[Bm, Hm, q_len, kv_len]``: the mask itself, materialised (small sizes)."""
        bm, hm = self.tiles.shape[:2]
        b = np.arange(bm, dtype=np.int32)[:, None, None, None]
        h = np.arange(hm, dtype=np.int32)[None, :, None, None]
        q = np.arange(self.q_len, dtype=np.int32)[None, None, :, None]
        k = np.arange(self.kv_len, dtype=np.int32)[None, None, None, :]
        out = self.mask_mod(jnp.asarray(b), jnp.asarray(h), jnp.asarray(q), jnp.asarray(k))
        return np.broadcast_to(np.asarray(out, bool), (bm, hm, self.q_len, self.kv_len))

    def __repr__(self) -> str:
        return (
            f"BlockMask(q_len={self.q_len}, kv_len={self.kv_len}, block=({self.block_q}, "
            f"{self.block_k}), tiles={self.shape}, "
            + (f"density={self.density:.3f})" if self.static else "traced)")
        )

    def to_string(self, b: int = 0, h: int = 0, max_tiles: int = 64) -> str:
        """A text rendering of the tile classes (``#`` full, ``+`` partial, ``.`` empty)."""
        tiles = np.asarray(self.tiles)[b, h][:max_tiles, :max_tiles]
        chars = np.array([".", "+", "#"])
        return "\n".join("".join(row) for row in chars[tiles])

    def render(self, path, *, b: int = 0, h: int = 0, dpi: int = 100):
        """Write a PNG of the tile classes beside the dense mask."""
        return render_block_mask(self, path, b=b, h=h, dpi=dpi)


def _flatten(bm: BlockMask):
    arrays = tuple(getattr(bm, n) for n in BlockMask._ARRAYS)
    as_leaf = isinstance(bm.mask_mod, Mask)  # library mods are pytrees
    children = (*arrays, bm.mask_mod if as_leaf else None)
    aux = (bm.q_len, bm.kv_len, bm.block_q, bm.block_k, None if as_leaf else bm.mask_mod)
    return children, aux


def _unflatten(aux, children):
    q_len, kv_len, bq, bk, static_mod = aux
    *arrays, leaf_mod = children
    return BlockMask(q_len, kv_len, bq, bk, *arrays, static_mod if leaf_mod is None else leaf_mod)


jax.tree_util.register_pytree_node(BlockMask, _flatten, _unflatten)


def union_lists(bm: BlockMask) -> tuple[Any, ...]:
    """The tile lists of ``bm`` shared by the batch and heads: their union.

    The engine and the kernels run each ``(b, h)``'s own lists where ``bm`` has
    more than one (:mod:`efficient_attn.core.engine.groups`,
    :func:`efficient_attn.kernels.common.list_rows`); this is for ``(1, 1)``.

    A tile is visited when any ``(b, h)`` sees a pair in it, and runs unmasked
    only when it is full for all of them. Returns ``(kv_num [nq], kv_idx
    [nq, W], full_kv_num, full_kv_idx, q_num [nk], q_idx [nk, W'],
    full_q_num, full_q_idx)``.
    """
    if bm.tiles.shape[:2] == (1, 1):
        return tuple(
            getattr(bm, n)[0, 0]
            for n in ("kv_num", "kv_indices", "full_kv_num", "full_kv_indices",
                      "q_num", "q_indices", "full_q_num", "full_q_indices")
        )  # fmt: skip
    xp = _xp(bm.tiles)
    t = xp.asarray(bm.tiles)
    visited, full = (t != EMPTY).any((0, 1)), (t == FULL).all((0, 1))
    partial = visited & ~full
    static = xp is np
    return (
        *_lists(partial, xp, static), *_lists(full, xp, static),
        *_lists(partial.T, xp, static), *_lists(full.T, xp, static),
    )  # fmt: skip


def group_lists(bm: BlockMask, groups: int) -> tuple[Any, ...]:
    """The transposed tile lists of each K/V head over its ``groups`` query heads' own tiles.

    For a mask that differs per query head (``Hm = N = K * groups``, ``groups > 1``):
    the dK/dV kernel of K/V head ``c`` visits each (query tile ``i``, query head
    ``c * groups + g``) pair whose tile is partial (full) for that head. Returns
    ``(q_num [Bm, K, nk], q_pairs [Bm, K, nk, W], full_q_num, full_q_pairs)``, each pair
    encoded ``i * groups + g``, ascending.
    """
    xp = _xp(bm.tiles)
    t = xp.asarray(bm.tiles)
    b, n, nq, nk = t.shape
    if groups < 1 or n % groups:
        raise ValueError(f"groups={groups} must divide the block mask's heads {n}")
    t = xp.transpose(t.reshape(b, n // groups, groups, nq, nk), (0, 1, 4, 3, 2))
    t = t.reshape(b, n // groups, nk, nq * groups)
    static = xp is np
    return (*_lists(t == PARTIAL, xp, static), *_lists(t == FULL, xp, static))


def check_block_mask(bm: Any, q_len: int, kv_len: int, batch: int, heads: int) -> BlockMask:
    """``bm`` is a :class:`BlockMask` for this call's sizes, else ``ValueError``."""
    if not isinstance(bm, BlockMask):
        raise ValueError(f"block_mask must be an ea.BlockMask (from ea.block_mask); got {bm!r}")
    if (bm.q_len, bm.kv_len) != (q_len, kv_len):
        raise ValueError(
            f"block_mask was built for q_len={bm.q_len}, kv_len={bm.kv_len}; this call has "
            f"q_len={q_len}, kv_len={kv_len}"
        )
    bm_b, bm_h = bm.tiles.shape[:2]
    if bm_b not in (1, batch) or bm_h not in (1, heads):
        raise ValueError(
            f"block_mask has batch={bm_b}, heads={bm_h}; this call has batch={batch}, "
            f"heads={heads} (1 means the mask does not depend on it)"
        )
    return bm
