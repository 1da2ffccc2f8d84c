"""Tile classification: which tiles of a mask are empty, partial or full; pairs each sees.

On device, for masks over traced data: from the mask's runs of visible keys per
query row (:meth:`~efficient_attn.core.mods.Mask.row_intervals`: documents over
sorted segment ids, per-example prefixes, causal, windows and their ``&``) by
prefix sums in O(Tq log Tk + nq nk log bq), else by evaluating every pair
(``jax.lax.map`` over query tiles; also when the data break the runs' promise,
e.g. unsorted ids). Static masks: from a library mask's
:meth:`~efficient_attn.core.mods.Mask.tile_bounds` (only the undecided tiles are
evaluated, in NumPy where the mask allows), or compiled on the CPU in a thread of
its own (static masks under ``jit`` or ``shard_map``).
"""

from __future__ import annotations

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core.blockmask.mask import EMPTY, FULL, PARTIAL
from efficient_attn.core.mods.base import Mask


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


def _from_runs(lo, hi, q_pos, k_pos, q_limit, k_limit, bm, hm, bq, bk):
    """``(tiles int8, visible int32, monotone)`` from each row's run of visible keys.

    ``lo``/``hi`` broadcastable to ``[Bm, Hm, Tq]``: row ``i`` sees keys ``[lo_i, hi_i)``
    (indices into ``k_pos``). A tile's visible pairs are ``F(end) - F(start)`` with
    ``F(x) = sum_i clip(x, lo_i, hi_i)``, and for runs non-decreasing along the tile's
    rows ``F`` is three prefix sums split at two binary searches: O(nq nk log bq).
    """
    nq, nk = q_pos.shape[0] // bq, k_pos.shape[0] // bk
    shape = (bm, hm, nq * bq)
    n_valid = jnp.sum(k_pos < k_limit, dtype=jnp.int32)  # keys past k_limit: the padded tail
    q_ok = q_pos < q_limit  # queries past q_limit: the padded tail, empty runs at the end
    hi = jnp.where(q_ok, jnp.clip(jnp.broadcast_to(hi, shape), 0, n_valid), n_valid)
    lo = jnp.where(q_ok, jnp.clip(jnp.broadcast_to(lo, shape), 0, hi), n_valid)
    lo, hi = lo.astype(jnp.int32), hi.astype(jnp.int32)
    monotone = jnp.all(lo[..., 1:] >= lo[..., :-1]) & jnp.all(hi[..., 1:] >= hi[..., :-1])
    lo, hi = lo.reshape(bm, hm, nq, bq), hi.reshape(bm, hm, nq, bq)
    zero = jnp.zeros((bm, hm, nq, 1), jnp.int32)
    sum_lo = jnp.concatenate([zero, jnp.cumsum(lo, -1, dtype=jnp.int32)], -1)  # [.., bq + 1]
    sum_hi = jnp.concatenate([zero, jnp.cumsum(hi, -1, dtype=jnp.int32)], -1)
    x = jnp.arange(nk + 1, dtype=jnp.int32) * bk  # key tile boundaries
    search = jax.vmap(lambda a: jnp.searchsorted(a, x, side="right").astype(jnp.int32))
    below = search(hi.reshape(-1, bq)).reshape(bm, hm, nq, nk + 1)  # rows with hi_i <= x
    inside = search(lo.reshape(-1, bq)).reshape(bm, hm, nq, nk + 1)  # rows with lo_i <= x
    f = (jnp.take_along_axis(sum_hi, below, -1) + x * (inside - below)
         + sum_lo[..., -1:] - jnp.take_along_axis(sum_lo, inside, -1))  # fmt: skip
    visible = f[..., 1:] - f[..., :-1]
    tiles = jnp.where(visible == bq * bk, FULL, jnp.where(visible > 0, PARTIAL, EMPTY))
    return tiles.astype(jnp.int8), visible, monotone


def _runs(mask_mod, q_pos, k_pos, q_limit, k_limit, bm, hm):
    """``mask_mod``'s :meth:`~efficient_attn.core.mods.Mask.row_intervals`, or None."""
    if not isinstance(mask_mod, Mask):
        return None
    b, h = jnp.arange(bm, dtype=jnp.int32), jnp.arange(hm, dtype=jnp.int32)
    q = jnp.minimum(jnp.asarray(q_pos, jnp.int32), q_limit - 1)
    k = jnp.minimum(jnp.asarray(k_pos, jnp.int32), k_limit - 1)
    return mask_mod.row_intervals(b, h, q, k)


def _classify_data(mask_mod, fn, consts, q_pos, k_pos, q_limit, k_limit, bm, hm, bq, bk):
    """On device: from the mask's runs of visible keys where it gives them (and the data
    keep their promise: sorted ids), else every pair evaluated (:func:`_classify`)."""
    runs = _runs(mask_mod, q_pos, k_pos, q_limit, k_limit, bm, hm)
    q_pos, k_pos = jnp.asarray(q_pos), jnp.asarray(k_pos)

    def pairwise():
        return _classify(fn, consts, q_pos, k_pos, q_limit, k_limit, bm, hm, bq, bk)

    if runs is None:
        return pairwise()
    lo, hi, exact = runs
    tiles, visible, monotone = _from_runs(lo, hi, q_pos, k_pos, q_limit, k_limit, bm, hm, bq, bk)
    ok = jnp.logical_and(exact, monotone)
    return jax.lax.cond(ok, lambda: (tiles, visible), pairwise)


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
    if not isinstance(mask_mod, Mask):
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


def _evaluate_static(mask_mod, fn, q_pos, k_pos, q_limit, k_limit, bm, hm, bq, bk):
    """Classify a static mask on the CPU, in a thread of its own (from its runs where it
    gives them, e.g. concrete segment ids; else every pair).

    JAX's trace and mesh contexts are thread-local: a fresh thread evaluates
    the mask as a plain computation even when the caller is tracing under
    ``jit`` or inside ``shard_map`` over Explicit mesh axes.
    """

    def run():
        with jax.default_device(jax.devices("cpu")[0]):
            args = (q_pos, k_pos, q_limit, k_limit, bm, hm, bq, bk)
            tiles, visible = jax.jit(lambda: _classify_data(mask_mod, fn, (), *args))()
            return np.asarray(tiles), np.asarray(visible)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()
