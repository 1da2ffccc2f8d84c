"""What the kernel bodies of both Pallas backends share: the static spec and one tile.

FlashAttention-2 (Dao 2023) over a FlexAttention block mask (Dong et al. 2024).
The bodies (:mod:`efficient_attn.kernels.bodies`) see 2-D refs whatever the
backend's memory layout: a query tile ``[bq, H]``, a whole key row ``[Tk_pad, H]``,
statistics ``[bq, 1]``. :class:`TileCtx` is one (query tile, key tile) pair of
one head: its positions, its mask (bounds, ``kv_len``, the ``mask_mod``), its
logits (scale, dense bias, ``score_mod``) and its dropout mask (the counter-based
hash of :mod:`efficient_attn.core.masking`, the XLA engine's, so one key drops the
same weights on every path). :class:`Block` describes the extra inputs and outputs
(bias, the mods' arrays, gradient buffers) once for both backends' grids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from efficient_attn.core import masking
from efficient_attn.kernels.closures import Closure, Unsupported
from efficient_attn.kernels.evaluate import Reader
from efficient_attn.kernels.layouts import aligned

__all__ = ["Block", "Spec", "Split", "TileCtx", "Unsupported", "split"]


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A pytree split into its array leaves (custom_vjp inputs) and the rest (a block mask)."""

    leaves: tuple[Any, ...]
    positions: tuple[int, ...]
    treedef: Any
    static: tuple[Any, ...]

    def rebuild(self, arrays) -> Any:
        leaves = list(self.static)
        for p, a in zip(self.positions, arrays, strict=True):
            leaves[p] = a
        return jax.tree.unflatten(self.treedef, leaves)


def split(tree: Any) -> Split:
    """:class:`Split` of ``tree``: jax arrays are leaves to pass, the rest (NumPy too) static."""
    leaves, treedef = jax.tree.flatten(tree)
    positions = tuple(i for i, x in enumerate(leaves) if isinstance(x, jax.Array))
    static = tuple(None if i in positions else x for i, x in enumerate(leaves))
    return Split(tuple(leaves[i] for i in positions), positions, treedef, static)


@dataclasses.dataclass(frozen=True)
class Block:
    """An extra kernel input or output: its block shape (None: squeezed) and block index
    ``index(t, b, hh)`` of the program (tile ``t``, example ``b``, head ``hh``); ``smem``: in
    SMEM on TPU."""

    shape: tuple[int | None, ...]
    index: Callable[..., tuple[Any, ...]]
    smem: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """Static parameters of the kernels of one call."""

    bq: int
    bk: int
    groups: int  # query heads per K/V head
    q_limit: int  # rows at or past these positions are padding
    k_limit: int
    scale: float | None  # None: traced, read from the kernels' scale input
    has_kv_len: bool
    mask: Closure | None
    score: Closure | None
    bound_full: bool  # kernel tiles overhang the block mask's: bound-check full tiles too
    heads_first: bool  # layout of the grouped query rows in the dK/dV kernel
    exact_f32: bool  # float32 inputs: no TF32 in Triton dots
    bias: tuple[bool, bool, bool, bool] | None = None  # the bias varies along (B, N, Tq, Tk)
    dropout: float = 0.0
    dropout_broadcast: bool = False
    interpret: bool = False
    lists: tuple[int, int] = (1, 1)  # the block mask's (Bm, Hm): per-(b, h) tile lists

    @property
    def pairs(self) -> bool:
        """The dK/dV lists hold (query tile, query head) pairs: a per-head mask under GQA."""
        return self.lists[1] > 1 and self.groups > 1

    @property
    def bias_dkdv(self) -> bool:
        """The bias gradient comes from the dK/dV kernel (it varies along keys), else dQ."""
        return self.bias is not None and self.bias[3]

    def grads_of_score(self) -> list[int]:
        """The score_mod's arrays whose gradients the dK/dV kernel emits."""
        if self.score is None:
            return []
        return [n for n, lay in enumerate(self.score.layouts) if lay.grad]


def dot(a, b, spec: Spec, trans_b: bool = False, trans_a: bool = False):
    """``a @ b`` (optionally transposed) accumulated in float32."""
    ca = 0 if trans_a else 1
    cb = 1 if trans_b else 0
    precision = jax.lax.Precision.HIGHEST if spec.exact_f32 else None
    return jax.lax.dot_general(
        a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
    )


@dataclasses.dataclass
class Inputs:
    """What a kernel's tiles read besides q, k, v: the scale, and the refs of the mods'
    arrays (per closure, per array ``{role: ref}``) and the score's gradient outputs."""

    scale: Any
    mask: list
    score: list
    score_grads: dict
    dkdv: bool = False  # the dK/dV kernel's (tables arrive as key tiles' column slabs)


class TileCtx:
    """Indices, mask, logits and dropout of the tile (query tile ``i``, key tile ``j``) of
    head ``h`` of example ``b``."""

    def __init__(self, spec: Spec, b, h, i, j, kv_len, ins: Inputs, seed=None):
        self.spec, self.i, self.j = spec, i, j
        self.i0, self.j0 = aligned(i * spec.bq, spec.bq), aligned(j * spec.bk, spec.bk)
        shape = self.shape = (spec.bq, spec.bk)
        qp = i * spec.bq + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        kp = j * spec.bk + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        self.b, self.h, self.dkdv = b, h, ins.dkdv
        self.q_ok, self.k_ok = qp < spec.q_limit, kp < spec.k_limit
        self.qi = jnp.minimum(qp, spec.q_limit - 1)
        self.ki = jnp.minimum(kp, spec.k_limit - 1)
        self.kv_ok = None if kv_len is None else kp < kv_len
        self.seed, self.scale = seed, ins.scale
        self.mask_mod = None if spec.mask is None else Reader(spec.mask, ins.mask, self)
        self.score_mod = None if spec.score is None else Reader(
            spec.score, ins.score, self, ins.score_grads, spec.interpret)  # fmt: skip

    @property
    def index(self):
        return self.b, self.h, self.qi, self.ki

    def mask(self, partial: bool):
        """Bool ``[bq, bk]`` or None (every pair visible)."""
        mask = None
        if partial or self.spec.bound_full:
            mask = self.q_ok & self.k_ok
            if self.mask_mod is not None:
                mask = mask & jnp.broadcast_to(self.mask_mod(*self.index), mask.shape)
        if self.kv_ok is not None:
            mask = self.kv_ok if mask is None else mask & self.kv_ok
        return mask

    def raw(self, q, k, bias):
        """``scale * q k^T + bias``, float32 ``[bq, bk]`` (before the score_mod)."""
        s = dot(q, k, self.spec, trans_b=True) * self.scale
        return s if bias is None else s + bias.astype(jnp.float32)

    def logits(self, q, k, bias):
        """``score_mod(scale * q k^T + bias)``, float32 ``[bq, bk]``."""
        s = self.raw(q, k, bias)
        return s if self.score_mod is None else self.score_mod(s, *self.index)

    def dropout(self):
        """``drop(x)``: this tile's counter-based dropout (the identity without dropout)."""
        spec = self.spec
        if not spec.dropout:
            return lambda x: x
        drop = masking.Dropout(spec.dropout, self.seed, spec.dropout_broadcast)
        keep = drop.keep(*self.index)
        return lambda x: drop.scale(x, keep)


def key_rows(ref, j, bk: int, kv_ok_rows):
    """Key tile ``j`` of a ``[Tk_pad, H]`` ref, rows past ``kv_len`` zeroed (they may hold NaN)."""
    x = ref[pl.ds(aligned(j * bk, bk), bk), :]
    return x if kv_ok_rows is None else jnp.where(kv_ok_rows, x, jnp.zeros_like(x))


def rows_ok(kv_len, j, bk: int):
    if kv_len is None:
        return None
    return (j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0)) < kv_len


def list_rows(spec: Spec, cnt_ref, b, h, kv_heads: bool = False):
    """``(count row, first list row)`` of example ``b``, head ``h`` in the scalar inputs.

    Counts are ``[B * Hl, R]`` and lists ``[Bl * Hl * R, W]`` for the block mask's
    ``(Bl, Hl) = (Bm, Hm)`` (``Hl`` counted in K/V heads with ``kv_heads``), so each
    program reads its own ``(b mod Bm, h mod Hm)`` lists; a mask shared by the batch and
    heads (1, 1) reads row ``b`` of the counts and row ``i`` of the lists, as before.
    """
    bl, hl = spec.lists
    if kv_heads and hl > 1:
        hl //= spec.groups
    r = cnt_ref.shape[1]
    if hl == 1:
        return b, (b * r if bl > 1 else 0)
    return b * hl + h, ((b * hl if bl > 1 else 0) + h) * r


def at(base, i):
    """List row ``base + i`` (no op for the shared lists' ``base`` 0)."""
    return i if isinstance(base, int) and base == 0 else base + i


def prologue(spec: Spec, b, refs):
    """``(kv_len[b] or None, the dropout seed or None, the remaining refs)``."""
    kv_len = None
    if spec.has_kv_len:
        kv_len, refs = refs[0][b], refs[1:]
    seed = None
    if spec.dropout:
        seed, refs = (refs[0][0].astype(jnp.uint32), refs[0][1].astype(jnp.uint32)), refs[1:]
    return kv_len, seed, refs


def roles(c: Closure | None) -> list[tuple[int, str]]:
    """The kernel inputs of a closure's arrays, in order: ``(array, role)``."""
    if c is None:
        return []
    out = []
    for n, lay in enumerate(c.layouts):
        if lay.whole:
            out.append((n, "whole"))
        if lay.smem:
            out.append((n, "smem"))
        if lay.col is not None:
            out.append((n, "col"))
        if lay.row is not None:
            out.append((n, "row"))
        if lay.tile is not None:
            out.append((n, "tile"))
    return out


def split_refs(spec: Spec, refs, grads: bool = False):
    """``(bias ref or None, Inputs, outputs)`` of the refs after a kernel's main inputs."""
    scale = spec.scale
    if scale is None:
        scale, refs = refs[0][0], refs[1:]
    bias = None
    if spec.bias is not None:
        bias, refs = refs[0], refs[1:]
    per = []
    for c in (spec.mask, spec.score):
        arrays = [{} for _ in (c.arrays if c is not None else ())]
        for n, role in roles(c):
            arrays[n][role], refs = refs[0], refs[1:]
        per.append(arrays)
    atomic = [n for n in spec.grads_of_score() if spec.score.layouts[n].grad == "atomic"]
    if grads:  # atomic gradient buffers arrive as inputs too (aliased to their outputs)
        refs = refs[len(atomic) :]
    return bias, Inputs(scale, per[0], per[1], {}, grads), refs


def zero_fill(ref, lay=None) -> None:
    """Zero a gradient output block (SMEM blocks one scalar at a time)."""
    if lay is not None and lay.smem:
        size = ref.shape[-1]

        def body(e, _):
            ref[0, e] = jnp.zeros((), ref.dtype)
            return 0

        jax.lax.fori_loop(0, size, body, 0)
        return
    ref[...] = jnp.zeros(ref.shape, ref.dtype)
