"""Block masks: which tiles of the ``[Tq, Tk]`` scores a ``mask_mod`` leaves empty, partial or full.

FlexAttention's ``BlockMask`` (Dong et al. 2024) and splash attention's
``MaskInfo``: the tile engine (:mod:`efficient_attn.core.engine`) skips empty tiles,
runs full tiles without evaluating the mask and masks partial tiles with the
``mask_mod`` itself. Masks over indices only are evaluated once at trace time
(compiled, on the CPU) and cached as NumPy arrays, so they are constants of
the program; masks over data (segment ids, per-example prefix lengths) are
built on device inside ``jit``, so new values never retrace or recompile.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core import masking
from efficient_attn.core import mods as _mods

EMPTY, PARTIAL, FULL = 0, 1, 2


# ---- hoisting the arrays a mod closes over -----------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Hoisted:
    """A mod traced at fixed argument shapes, with the tracers it closes over made arguments.

    ``fn(*args, *consts)`` evaluates the mod; ``consts`` are the closed-over
    tracers (captured buffers: segment ids, learned tables), which the tile
    engine passes through its ``custom_vjp`` explicitly so gradients reach
    them (what ``jax.closure_convert`` does, also for integer arrays).
    """

    fn: Callable[..., Any]
    consts: tuple[Any, ...]
    out: jax.ShapeDtypeStruct
    uses: tuple[bool, ...]  # which positional arguments the mod reads

    @property
    def static(self) -> bool:
        """True when the mod depends on nothing but its arguments (no traced data)."""
        return not self.consts


def hoist(name: str, fn: Callable[..., Any], *example: Any) -> Hoisted:
    """Trace ``fn(*example)`` (arrays) into a :class:`Hoisted`; non-array output: ``ValueError``."""
    if not callable(fn):
        raise ValueError(f"{name} must be a callable; got {fn!r}")
    try:
        closed = jax.make_jaxpr(fn)(*example)
    except (TypeError, IndexError) as e:
        raise ValueError(f"{name} failed on broadcastable int32 index arrays: {e}") from e
    if len(closed.out_avals) != 1:
        raise ValueError(f"{name} must return one array; it returned {len(closed.out_avals)}")
    jaxpr, consts = closed.jaxpr, list(closed.consts)
    traced = [i for i, c in enumerate(consts) if isinstance(c, jax.core.Tracer)]
    fixed = [None if i in traced else c for i, c in enumerate(consts)]
    n = len(example)

    def converted(*args):
        values = list(fixed)
        for i, c in zip(traced, args[n:], strict=True):
            values[i] = c
        return jax.core.eval_jaxpr(jaxpr, values, *args[:n])[0]

    used = set()
    for eqn in jaxpr.eqns:
        used.update(id(v) for v in eqn.invars)
    used.update(id(v) for v in jaxpr.outvars)
    uses = tuple(id(v) in used for v in jaxpr.invars)
    aval = closed.out_avals[0]
    out = jax.ShapeDtypeStruct(aval.shape, aval.dtype)
    return Hoisted(converted, tuple(consts[i] for i in traced), out, uses)


def check_mask_output(out: jax.ShapeDtypeStruct, shape: tuple[int, ...]) -> None:
    """A ``mask_mod`` must return booleans broadcastable to the index shape."""
    if out.dtype != jnp.bool_:
        raise ValueError(
            f"mask_mod must return a boolean array (e.g. kv_idx <= q_idx); it returned {out.dtype}"
        )
    try:
        np.broadcast_shapes(out.shape, shape)
    except ValueError:
        raise ValueError(
            f"mask_mod returned shape {out.shape}, not broadcastable to its indices' {shape}"
        ) from None


# ---- the block mask ------------------------------------------------------------


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
        from efficient_attn.core.patterns import render_block_mask

        return render_block_mask(self, path, b=b, h=h, dpi=dpi)


def _flatten(bm: BlockMask):
    arrays = tuple(getattr(bm, n) for n in BlockMask._ARRAYS)
    as_leaf = isinstance(bm.mask_mod, _mods.Mask)  # library mods are pytrees
    children = (*arrays, bm.mask_mod if as_leaf else None)
    aux = (bm.q_len, bm.kv_len, bm.block_q, bm.block_k, None if as_leaf else bm.mask_mod)
    return children, aux


def _unflatten(aux, children):
    q_len, kv_len, bq, bk, static_mod = aux
    *arrays, leaf_mod = children
    return BlockMask(q_len, kv_len, bq, bk, *arrays, static_mod if leaf_mod is None else leaf_mod)


jax.tree_util.register_pytree_node(BlockMask, _flatten, _unflatten)


# ---- building ------------------------------------------------------------------

_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 128


def _index_args(bm: int, hm: int, bq: int, tk: int):
    """Builder index arrays: b [Bm,1,1,1], h [1,Hm,1,1], q [1,1,bq,1], kv [1,1,1,Tk]."""
    return (  # NumPy: constants, also inside shard_map over Explicit mesh axes
        np.arange(bm, dtype=np.int32).reshape(bm, 1, 1, 1),
        np.arange(hm, dtype=np.int32).reshape(1, hm, 1, 1),
        np.zeros((1, 1, bq, 1), np.int32),
        np.zeros((1, 1, 1, tk), np.int32),
    )


def _classify(fn, consts, q_pos, k_pos, q_limit, k_limit, bm, hm, bq, bk):
    """``(tiles int8, visible int32)`` ``[Bm, Hm, nq, nk]`` of ``fn`` at the given positions."""
    nq, nk = q_pos.shape[0] // bq, k_pos.shape[0] // bk
    b, h = _index_args(bm, hm, 1, 1)[:2]
    k_ok = k_pos < k_limit
    kv = jnp.minimum(k_pos, k_limit - 1).reshape(1, 1, 1, -1)

    def tile(i):
        qp = jax.lax.dynamic_slice_in_dim(q_pos, i * bq, bq)
        q = jnp.minimum(qp, q_limit - 1).reshape(1, 1, bq, 1)
        m = fn(b, h, q, kv, *consts) & (qp < q_limit)[:, None] & k_ok[None, :]
        m = jnp.broadcast_to(m, (bm, hm, bq, nk * bk)).reshape(bm, hm, bq, nk, bk)
        count = m.sum((2, 4), dtype=jnp.int32)
        cls = jnp.where(count == bq * bk, FULL, jnp.where(count > 0, PARTIAL, EMPTY))
        return cls.astype(jnp.int8), count

    tiles, visible = jax.lax.map(tile, jnp.arange(nq))
    return jnp.moveaxis(tiles, 0, 2), jnp.moveaxis(visible, 0, 2)


_classify_jit = jax.jit(_classify, static_argnums=(0, 4, 5, 6, 7, 8, 9))


def _count_tiles(mask_mod, qs, ks, q_limit, k_limit, chunk: int = 64):
    """Visible pairs of each tile ``qs[u] x ks[u]`` (``[U, bq]``, ``[U, bk]``): ``[U]`` int32.

    For a mask over positions only, called on NumPy index arrays in chunks of
    tiles: library masks evaluate in NumPy (nothing compiled); a ``jnp`` mask
    runs op by op (JAX caches each primitive per shape).
    """
    b = np.zeros((1, 1, 1, 1, 1), np.int32)
    u, bq, bk = qs.shape[0], qs.shape[1], ks.shape[1]
    pad = -u % chunk
    qs = np.concatenate([qs, np.full((pad, bq), q_limit, np.int32)])
    ks = np.concatenate([ks, np.full((pad, bk), k_limit, np.int32)])
    counts = []
    for c in range(0, u + pad, chunk):
        qp, kp = qs[c : c + chunk], ks[c : c + chunk]
        q = np.minimum(qp, q_limit - 1)[:, None, None, :, None]
        k = np.minimum(kp, k_limit - 1)[:, None, None, None, :]
        m = np.asarray(mask_mod(b, b, q, k), bool)  # NumPy in, NumPy out for library masks
        m = np.broadcast_to(m, (qp.shape[0], 1, 1, bq, bk))[:, 0, 0]
        m = m & (qp < q_limit)[:, :, None] & (kp < k_limit)[:, None, :]
        counts.append(m.sum((1, 2), dtype=np.int32))
    return np.concatenate(counts)[:u]


def _numpy_capable(mask_mod) -> bool:
    """Whether ``mask_mod`` evaluates NumPy index arrays to a NumPy result."""
    z = np.zeros((1, 1, 1, 1), np.int32)
    try:
        return isinstance(mask_mod(z, z, z, z), np.ndarray | np.bool_)
    except Exception:  # e.g. a jnp-only expression
        return False


def _bounded_static(mask_mod, q_pos, k_pos, q_limit, k_limit, bq, bk):
    """``(tiles, visible) [1, 1, nq, nk]`` of a static mask from its :meth:`tile_bounds`.

    Tiles the bounds prove empty or full are classified without evaluation;
    only the undecided ones (near the mask's edges) are evaluated. None when the
    mask gives no bounds.
    """
    if not isinstance(mask_mod, _mods.Mask):
        return None
    nq, nk = q_pos.size // bq, k_pos.size // bk
    qt, kt = q_pos.reshape(nq, bq), k_pos.reshape(nk, bk)
    q_ok, k_ok = qt < q_limit, kt < k_limit
    big = np.iinfo(np.int32).max
    q_lo, q_hi = np.where(q_ok, qt, big).min(1), np.where(q_ok, qt, -1).max(1)
    k_lo, k_hi = np.where(k_ok, kt, big).min(1), np.where(k_ok, kt, -1).max(1)
    bounds = mask_mod.tile_bounds(
        q_lo[:, None].astype(np.int64), q_hi[:, None].astype(np.int64),
        k_lo[None, :].astype(np.int64), k_hi[None, :].astype(np.int64),
    )  # fmt: skip
    if bounds is None:  # no bounds: every tile is evaluated, in NumPy where the mask allows
        if nq * nk * bq * bk > 2**28 or not _numpy_capable(mask_mod):
            return None
        bounds = (np.True_, np.False_)
    may, must = (np.broadcast_to(np.asarray(x, bool), (nq, nk)) for x in bounds)
    may = may & q_ok.any(1)[:, None] & k_ok.any(1)[None, :]
    must = must & may & q_ok.all(1)[:, None] & k_ok.all(1)[None, :]
    tiles = np.where(must, FULL, EMPTY).astype(np.int8)
    visible = np.where(must, bq * bk, 0).astype(np.int32)
    ui, uj = np.nonzero(may & ~must)
    if ui.size:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # no trace context
            counts = pool.submit(_count_tiles, mask_mod, qt[ui], kt[uj], q_limit, k_limit).result()
        visible[ui, uj] = counts
        tiles[ui, uj] = np.where(counts == bq * bk, FULL, np.where(counts > 0, PARTIAL, EMPTY))
    return tiles[None, None], visible[None, None]


def _evaluate_static(fn, q_pos, k_pos, q_limit, k_limit, bm, hm, bq, bk):
    """Classify a static mask on the CPU, in a thread of its own.

    JAX's trace and mesh contexts are thread-local: a fresh thread evaluates
    the mask as a plain computation even when the caller is tracing under
    ``jit`` or inside ``shard_map`` over Explicit mesh axes.
    """

    def run():
        with jax.default_device(jax.devices("cpu")[0]):
            tiles, visible = _classify_jit(
                fn, (), jnp.asarray(q_pos), jnp.asarray(k_pos), q_limit, k_limit, bm, hm, bq, bk
            )
            return np.asarray(tiles), np.asarray(visible)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


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
        tiles, visible = _classify(h.fn, h.consts, jnp.asarray(q_pos), jnp.asarray(k_pos),
                                   q_limit, k_limit, bm, hm, bq, bk)  # fmt: skip
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
        tiles, visible = _evaluate_static(h.fn, q_pos, k_pos, q_limit, k_limit, bm, hm, bq, bk)
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
    mod = _mods.and_masks(a.mask_mod, b.mask_mod)
    return BlockMask.from_tiles(
        tiles.astype(np.int8), visible, mod, a.q_len, a.kv_len, a.block_q, a.block_k
    )


def union_lists(bm: BlockMask) -> tuple[Any, ...]:
    """The tile lists the engine runs: the union over batch and heads of ``bm``.

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


__all__: Sequence[str] = (
    "BlockMask",
    "and_block_masks",
    "block_mask",
    "build",
    "build_inferred",
    "hoist",
)
