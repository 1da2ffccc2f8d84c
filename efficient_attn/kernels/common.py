"""Kernel bodies shared by the Pallas backends: forward, dK/dV and dQ over tile lists.

FlashAttention-2 (Dao 2023) over a FlexAttention block mask (Dong et al. 2024):
each program owns one tile of outputs and loops over the key (or query) tiles
its list names, first the partial tiles (``mask_mod`` evaluated in the tile),
then the full ones (no in-tile mask). Statistics are float32.

The bodies see 2-D refs whatever the backend's memory layout: a query tile
``[bq, H]``, a whole key row ``[Tk_pad, H]``, statistics ``[bq, 1]``. Only the
grouped query rows of the dK/dV kernel differ by layout (``heads_first``).
Scalars (tile lists, counts, ``kv_len``) are read one at a time from int32
refs (SMEM on TPU).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

# ---- mods as kernel inputs ---------------------------------------------------------


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A pytree split into its array leaves (kernel or custom_vjp inputs) and the rest.

    Library mods (:mod:`efficient_attn.core.mods`) and block masks are pytrees: their
    arrays (segment ids, slopes, tile lists) become inputs, and the kernel calls
    the mod rebuilt around its input refs, so ``ids[b, q_idx]`` is a load, not
    a captured constant.
    """

    leaves: tuple[Any, ...]
    positions: tuple[int, ...]
    treedef: Any
    static: tuple[Any, ...]

    def rebuild(self, arrays) -> Any:
        leaves = list(self.static)
        for p, a in zip(self.positions, arrays, strict=True):
            leaves[p] = a
        return jax.tree.unflatten(self.treedef, leaves)

    def arrays_of(self, tree) -> tuple[Any, ...]:
        """The array leaves of ``tree`` (same structure, other values) at this split's places."""
        leaves = jax.tree.leaves(tree)
        return tuple(leaves[p] for p in self.positions)


def split(tree: Any, numpy_static: bool = False) -> Split:
    """:class:`Split` of ``tree``: arrays are leaves to pass, the rest static.

    ``numpy_static``: NumPy arrays stay static too (trace-time tile lists).
    """
    leaves, treedef = jax.tree.flatten(tree)
    keep = (lambda x: isinstance(x, jax.Array)) if numpy_static else _is_array
    positions = tuple(i for i, x in enumerate(leaves) if keep(x))
    static = tuple(None if i in positions else x for i, x in enumerate(leaves))
    return Split(tuple(leaves[i] for i in positions), positions, treedef, static)


class Unsupported(Exception):
    """Raised while preparing a call the fused kernels cannot run; the message says why."""


def kernel_mod(name: str, mod: Any, example: tuple[Any, ...]) -> Split | None:
    """Split ``mod`` for the kernels; :class:`Unsupported` if it closes over other arrays.

    ``example``: arguments of the right shapes (index arrays, a score tile).
    """
    if mod is None:
        return None
    km = split(mod)
    n = len(km.leaves)
    closed = jax.make_jaxpr(lambda *a: km.rebuild(a[:n])(*a[n:]))(*km.leaves, *example)
    captured = [c for c in closed.consts if np.ndim(c) > 0 or isinstance(c, jax.core.Tracer)]
    if captured:
        raise Unsupported(
            f"{name} closes over {len(captured)} array(s) that are not pytree leaves of the "
            "mod (use the library's mods, e.g. ea.mods.document_mask, or a pytree dataclass)"
        )
    return km


# ---- the static description of one kernel call ------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """Static parameters of the kernels of one call."""

    bq: int
    bk: int
    groups: int  # query heads per K/V head
    q_limit: int  # rows at or past these positions are padding
    k_limit: int
    scale: float
    has_kv_len: bool
    mask: Split | None
    score: Split | None
    bound_full: bool  # kernel tiles overhang the block mask's: bound-check full tiles too
    heads_first: bool  # layout of the grouped query rows in the dK/dV kernel
    exact_f32: bool  # float32 inputs: no TF32 in Triton dots
    views: tuple[tuple[bool, bool], ...] | None = None  # TPU: per mask array, whether its
    # length is Tq (a column ref) and Tk (a row ref), read through PositionView


def _dot(a, b, spec: Spec, trans_b: bool = False, trans_a: bool = False):
    """``a @ b`` (optionally transposed) accumulated in float32."""
    ca = 0 if trans_a else 1
    cb = 1 if trans_b else 0
    precision = jax.lax.Precision.HIGHEST if spec.exact_f32 else None
    return jax.lax.dot_general(
        a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
    )


class PositionView:
    """A per-position int array ``[B, T]`` of a mask_mod, where a kernel cannot gather (Mosaic).

    ``view[b, q_idx]`` and ``view[b, kv_idx]`` with the tile's own index arrays give the
    tile's column ``[bq, 1]`` or row ``[1, bk]`` slice broadcast to the tile (segment ids,
    per-token flags); any other indexing is :class:`Unsupported`.
    """

    def __init__(self, col, row, tile):
        self.col, self.row, self.tile = col, row, tile  # loaders (None: length mismatch)

    def __getitem__(self, key):
        t = self.tile
        if isinstance(key, tuple) and len(key) == 2 and key[0] is t.b:
            load = self.col if key[1] is t.qi else self.row if key[1] is t.ki else None
            if load is not None:
                return jnp.broadcast_to(load(), t.shape)
        raise Unsupported(
            "on TPU a mask_mod's arrays must be [batch, seq], read as arr[b, q_idx] or "
            "arr[b, kv_idx] (e.g. ea.mods.document_mask)"
        )


def views(tile, refs) -> list[PositionView]:
    """The :class:`PositionView` of each (column ``[Tq_pad, 1]``, row ``[1, Tk_pad]``) ref pair."""
    spec = tile.spec
    i0, j0 = _aligned(tile.i * spec.bq, spec.bq), _aligned(tile.j * spec.bk, spec.bk)
    out = []
    for (is_col, is_row), col, row in zip(spec.views, refs[::2], refs[1::2], strict=True):
        out.append(PositionView(
            (lambda c=col: c[pl.ds(i0, spec.bq), :]) if is_col else None,
            (lambda r=row: r[:, pl.ds(j0, spec.bk)]) if is_row else None, tile,
        ))  # fmt: skip
    return out


def check_views(spec: Spec) -> None:
    """Trace the mask through :class:`PositionView` stand-ins: :class:`Unsupported` if it
    reads its arrays any other way."""

    def trace():
        zero = jnp.zeros((), jnp.int32)
        tile = _TileCtx(spec, zero, zero, zero, zero, None, (), ())
        stand_ins = [
            PositionView((lambda: jnp.zeros((spec.bq, 1), jnp.int32)) if c else None,
                         (lambda: jnp.zeros((1, spec.bk), jnp.int32)) if r else None, tile)
            for c, r in spec.views
        ]  # fmt: skip
        return spec.mask.rebuild(stand_ins)(tile.b, tile.h, tile.qi, tile.ki)

    jax.make_jaxpr(trace)()


class _TileCtx:
    """Indices, masks and mods of the tile (query tile ``i``, key tile ``j``) of head ``h``."""

    def __init__(self, spec: Spec, b, h, i, j, kv_len, mask_refs, score_refs):
        self.spec, self.i, self.j = spec, i, j
        shape = self.shape = (spec.bq, spec.bk)
        qp = i * spec.bq + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        kp = j * spec.bk + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        self.b, self.h = b, h
        self.q_ok, self.k_ok = qp < spec.q_limit, kp < spec.k_limit
        self.qi = jnp.minimum(qp, spec.q_limit - 1)
        self.ki = jnp.minimum(kp, spec.k_limit - 1)
        self.kv_ok = None if kv_len is None else kp < kv_len
        self.mask_refs, self.score_refs = mask_refs, score_refs

    def mask(self, partial: bool):
        """Bool ``[bq, bk]`` or None (every pair visible)."""
        mask = None
        if partial or self.spec.bound_full:
            mask = self.q_ok & self.k_ok
            if self.spec.mask is not None:
                refs = self.mask_refs if self.spec.views is None else views(self, self.mask_refs)
                mod = self.spec.mask.rebuild(refs)
                mask = mask & jnp.broadcast_to(mod(self.b, self.h, self.qi, self.ki), mask.shape)
        if self.kv_ok is not None:
            mask = self.kv_ok if mask is None else mask & self.kv_ok
        return mask

    def logits(self, q, k):
        """``score_mod(scale * q k^T)``, float32 ``[bq, bk]``."""
        s = _dot(q, k, self.spec, trans_b=True) * self.spec.scale
        if self.spec.score is not None:
            s = self.score_fn()(s)
        return s

    def score_fn(self):
        mod = self.spec.score.rebuild(self.score_refs)
        return lambda s: mod(s, self.b, self.h, self.qi, self.ki)


def _key_rows(ref, j, bk: int, kv_ok_rows):
    """Key tile ``j`` of a ``[Tk_pad, H]`` ref, rows past ``kv_len`` zeroed (they may hold NaN)."""
    x = ref[pl.ds(_aligned(j * bk, bk), bk), :]
    return x if kv_ok_rows is None else jnp.where(kv_ok_rows, x, jnp.zeros_like(x))


def _aligned(start, n: int):
    """``start`` (a multiple of ``n``), with that fact given to the compiler when traced."""
    return start if isinstance(start, int) else pl.multiple_of(start, n)


def _rows_ok(kv_len, j, bk: int):
    if kv_len is None:
        return None
    return (j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0)) < kv_len


def _kv_len(spec: Spec, b, refs):
    """``(kv_len[b] or None, the remaining refs)``."""
    if not spec.has_kv_len:
        return None, refs
    return refs[0][b], refs[1:]


def _split_refs(spec: Spec, refs):
    nm = 0 if spec.mask is None else len(spec.mask.leaves) * (1 if spec.views is None else 2)
    ns = 0 if spec.score is None else len(spec.score.leaves)
    return refs[:nm], refs[nm : nm + ns], refs[nm + ns :]


# ---- forward -------------------------------------------------------------------------


def forward_kernel(spec: Spec, ids, p_cnt, p_idx, f_cnt, f_idx, *refs):
    """Out ``[bq, Hv]`` and lse ``[bq, 1]`` of one query tile of one head.

    Refs: counts ``[B, nq]`` and lists ``[nq, W]`` (partial, full), ``kv_len [B]``
    (if any), q ``[bq, H]``, k ``[Tk_pad, H]``, v ``[Tk_pad, Hv]``, the mods'
    arrays; outputs o ``[bq, Hv]``, lse ``[bq, 1]``.
    """
    i, b, h = ids()
    kv_len, refs = _kv_len(spec, b, refs)
    q_ref, k_ref, v_ref, *refs = refs
    mask_refs, score_refs, (o_ref, lse_ref) = _split_refs(spec, refs)
    q = q_ref[...]
    bq = spec.bq

    def run(partial, cnt, idx):
        def body(t, carry):
            o, m, l = carry
            j = idx[i, t]
            tile = _TileCtx(spec, b, h, i, j, kv_len, mask_refs, score_refs)
            rows = _rows_ok(kv_len, j, spec.bk)
            s = tile.logits(q, _key_rows(k_ref, j, spec.bk, rows))
            mask = tile.mask(partial)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe)
            alpha = jnp.exp(m - m_safe)
            v = _key_rows(v_ref, j, spec.bk, rows)
            pv = _dot(p.astype(v.dtype), v, spec)
            return o * alpha + pv, m_new, l * alpha + p.sum(axis=-1, keepdims=True)

        return lambda carry: jax.lax.fori_loop(0, cnt[b, i], body, carry)

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


def _tile_grads(spec: Spec, tile: _TileCtx, partial, q, k, v, do, lse, delta):
    """``(p, ds)`` of one tile: probabilities and the score cotangent (before the scale)."""
    if spec.score is None:
        s = tile.logits(q, k)
        mod_vjp = None
    else:
        raw = _dot(q, k, spec, trans_b=True) * spec.scale
        s, mod_vjp = jax.vjp(tile.score_fn(), raw)
    p = jnp.exp(s - lse)
    mask = tile.mask(partial)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = _dot(do, v, spec, trans_b=True)
    ds = p * (dp - delta)
    if mod_vjp is not None:
        (ds,) = mod_vjp(ds)
        if mask is not None:
            ds = jnp.where(mask, ds, 0.0)
    return p, ds


def _group_rows(ref, g, start, n: int, heads_first: bool):
    """Rows ``[start, start + n)`` of query head ``g`` of a grouped ref."""
    start = _aligned(start, n)
    return ref[g, pl.ds(start, n), :] if heads_first else ref[pl.ds(start, n), g, :]


def dkdv_kernel(spec: Spec, ids, p_cnt, p_idx, f_cnt, f_idx, *refs):
    """dK, dV ``[bk, H]`` of one key tile of one K/V head, over the query tiles that visit it.

    Refs: counts ``[B, nk]`` and transposed lists ``[nk, W]``, ``kv_len``, k and v
    tiles ``[bk, H]``, q and dO of the K/V head's G query heads (``[G, Tq_pad, H]``
    or ``[Tq_pad, G, H]``), lse and delta ``[G, Tq_pad, 1]``, the mods' arrays;
    outputs dk, dv ``[bk, H]``.
    """
    j, b, kh = ids()
    kv_len, refs = _kv_len(spec, b, refs)
    k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs = refs
    mask_refs, score_refs, (dk_ref, dv_ref) = _split_refs(spec, refs)
    rows = _rows_ok(kv_len, j, spec.bk)
    k = _key_rows(k_ref, 0, spec.bk, rows)
    v = _key_rows(v_ref, 0, spec.bk, rows)
    bq, hf = spec.bq, spec.heads_first

    def run(partial, cnt, idx):
        def body(t, carry):
            dk, dv = carry
            i = idx[j, jax.lax.div(t, spec.groups)]  # t >= 0: lax, not jnp's floor rules
            g = jax.lax.rem(t, spec.groups)
            tile = _TileCtx(spec, b, kh * spec.groups + g, i, j, kv_len, mask_refs, score_refs)
            q = _group_rows(q_ref, g, i * bq, bq, hf)
            do = _group_rows(do_ref, g, i * bq, bq, hf)
            lse = lse_ref[g, pl.ds(_aligned(i * bq, bq), bq), :]
            delta = delta_ref[g, pl.ds(_aligned(i * bq, bq), bq), :]
            p, ds = _tile_grads(spec, tile, partial, q, k, v, do, lse, delta)
            dv = dv + _dot(p.astype(do.dtype), do, spec, trans_a=True)
            dk = dk + _dot(ds.astype(q.dtype), q, spec, trans_a=True)
            return dk, dv

        return lambda carry: jax.lax.fori_loop(0, cnt[b, j] * spec.groups, body, carry)

    carry = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    carry = run(True, p_cnt, p_idx)(carry)
    dk, dv = run(False, f_cnt, f_idx)(carry)
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def dq_kernel(spec: Spec, ids, p_cnt, p_idx, f_cnt, f_idx, *refs):
    """dQ ``[bq, H]`` of one query tile of one head, over its forward tile lists.

    Refs: as :func:`forward_kernel`, then dO ``[bq, Hv]``, lse and delta
    ``[bq, 1]`` before the mods' arrays; output dq ``[bq, H]``.
    """
    i, b, h = ids()
    kv_len, refs = _kv_len(spec, b, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
    mask_refs, score_refs, (dq_ref,) = _split_refs(spec, refs)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def run(partial, cnt, idx):
        def body(t, dq):
            j = idx[i, t]
            tile = _TileCtx(spec, b, h, i, j, kv_len, mask_refs, score_refs)
            rows = _rows_ok(kv_len, j, spec.bk)
            k = _key_rows(k_ref, j, spec.bk, rows)
            v = _key_rows(v_ref, j, spec.bk, rows)
            _, ds = _tile_grads(spec, tile, partial, q, k, v, do, lse, delta)
            return dq + _dot(ds.astype(k.dtype), k, spec)

        return lambda dq: jax.lax.fori_loop(0, cnt[b, i], body, dq)

    dq = run(True, p_cnt, p_idx)(jnp.zeros(dq_ref.shape, jnp.float32))
    dq = run(False, f_cnt, f_idx)(dq)
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)
