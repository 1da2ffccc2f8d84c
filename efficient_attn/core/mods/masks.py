"""Mask mods over indices and arrays: causal, windows, chunks, prefix-LM, boolean, documents.

Sliding windows as in Mistral and Longformer (Beltagy et al. 2020), chunked
local attention as in Llama 4, Child et al.'s strided summary keys, prefix-LM
(Raffel et al. 2020), a boolean array, and document masks over packed
sequences. Each gives :meth:`~efficient_attn.core.mods.base.Mask.tile_bounds`
where it depends on positions only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core.mods.base import Mask, _int, _pytree


def _count_le(kv_idx, x):
    """How many of the ascending ``kv_idx [Tk]`` are ``<= x`` (any shape): a run's end."""
    return jnp.searchsorted(kv_idx, x, side="right").astype(jnp.int32)


# ---- masks over indices only ---------------------------------------------------


@_pytree()
@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every pair is visible (attention without a mask)."""

    def __call__(self, b, h, q_idx, kv_idx):
        return np.ones((), bool)

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        return np.True_, np.True_

    def row_intervals(self, b, h, q_idx, kv_idx):
        return 0, jnp.shape(kv_idx)[0], True


def full_mask() -> Full:
    """The mask of plain attention: every pair visible."""
    return Full()


@_pytree()
@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """``kv_idx <= q_idx + offset``."""

    offset: int = 0

    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        return k_lo <= q_hi + self.offset, k_hi <= q_lo + self.offset

    def row_intervals(self, b, h, q_idx, kv_idx):
        return 0, _count_le(kv_idx, q_idx + self.offset), True


def causal_mask(offset: int = 0) -> Causal:
    """Causal with an offset: query ``i`` sees keys ``j <= i + offset`` (0: top-left aligned)."""
    if not isinstance(offset, int | np.integer) or isinstance(offset, bool):
        raise ValueError(f"offset={offset!r} must be an int")
    return Causal(int(offset))


def causal_bottom_right(q_len: int, kv_len: int) -> Causal:
    """Bottom-right aligned causal (``ea.attention(causal=True)``): offset ``kv_len - q_len``."""
    return Causal(_int("kv_len", kv_len, 1) - _int("q_len", q_len, 1))


@_pytree()
@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
    """``q_idx + offset - left <= kv_idx <= q_idx + offset + right``."""

    left: int
    right: int
    offset: int = 0

    def __call__(self, b, h, q_idx, kv_idx):
        d = q_idx + self.offset - kv_idx
        return (d <= self.left) & (d >= -self.right)

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        d_lo, d_hi = q_lo + self.offset - k_hi, q_hi + self.offset - k_lo
        may = (d_hi >= -self.right) & (d_lo <= self.left)
        return may, (d_lo >= -self.right) & (d_hi <= self.left)

    def row_intervals(self, b, h, q_idx, kv_idx):
        a = q_idx + self.offset
        return _count_le(kv_idx, a - self.left - 1), _count_le(kv_idx, a + self.right), True


def sliding_window(left: int, right: int = 0, *, offset: int = 0) -> SlidingWindow:
    """Keys at most ``left`` positions before and ``right`` after the query (itself included).

    ``sliding_window(255)`` gives each causal query its 256 most recent keys
    (Mistral's window of 256); ``sliding_window(w, w)`` is Longformer's
    symmetric window. ``offset`` shifts the query's position (``Tk - Tq`` for
    bottom-right alignment in cross attention).
    """
    return SlidingWindow(_int("left", left), _int("right", right), int(offset))


@_pytree()
@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
    """``q_idx // chunk == kv_idx // chunk``."""

    chunk: int

    def __call__(self, b, h, q_idx, kv_idx):
        return (q_idx // self.chunk) == (kv_idx // self.chunk)

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        c = self.chunk
        may = (q_lo // c <= k_hi // c) & (k_lo // c <= q_hi // c)
        return may, (q_lo // c == q_hi // c) & (k_lo // c == k_hi // c) & (q_lo // c == k_lo // c)

    def row_intervals(self, b, h, q_idx, kv_idx):
        start = (q_idx // self.chunk) * self.chunk
        return _count_le(kv_idx, start - 1), _count_le(kv_idx, start + self.chunk - 1), True


def chunked_mask(chunk: int) -> Chunked:
    """Chunked local attention (Llama 4's iRoPE layers): queries see keys of their own chunk.

    Combine with :func:`causal_mask` for the causal version.
    """
    return Chunked(_int("chunk", chunk, 1))


@_pytree()
@dataclasses.dataclass(frozen=True)
class DilatedWindow(Mask):
    """``|q_idx - kv_idx| <= window * dilation`` and ``(q_idx - kv_idx) % dilation == 0``."""

    window: int
    dilation: int

    def __call__(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (abs(d) <= self.window * self.dilation) & (d % self.dilation == 0)

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        reach = self.window * self.dilation
        d_lo, d_hi = q_lo - k_hi, q_hi - k_lo
        may = (d_hi >= -reach) & (d_lo <= reach)
        return may, may & (self.dilation == 1) & (d_lo >= -reach) & (d_hi <= reach)


def dilated_window(window: int, dilation: int) -> DilatedWindow:
    """Dilated sliding window (Longformer): ``window`` keys each side, every ``dilation``-th."""
    return DilatedWindow(_int("window", window), _int("dilation", dilation, 1))


@_pytree()
@dataclasses.dataclass(frozen=True)
class StridedSummary(Mask):
    """``kv_idx % stride == stride - 1``: the summary keys of Child et al.'s fixed pattern."""

    stride: int

    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx % self.stride == self.stride - 1

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        s = self.stride
        first = k_lo + (s - 1 - k_lo) % s  # first summary key at or after k_lo
        may = np.broadcast_to(first <= k_hi, np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo)))
        return may, may & ((s == 1) | (k_lo == k_hi))


def strided_summary(stride: int) -> StridedSummary:
    """Every ``stride``-th key (the last of each block of ``stride``), for all queries."""
    return StridedSummary(_int("stride", stride, 1))


@_pytree()
@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
    """Causal, plus every key in the prefix: ``kv_idx <= q_idx or kv_idx < prefix``."""

    prefix: int

    def __call__(self, b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < self.prefix)

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        return (k_lo <= q_hi) | (k_lo < self.prefix), (k_hi <= q_lo) | (k_hi < self.prefix)

    def row_intervals(self, b, h, q_idx, kv_idx):
        return 0, _count_le(kv_idx, jnp.maximum(q_idx, self.prefix - 1)), True


@_pytree("lengths")
@dataclasses.dataclass(frozen=True)
class PrefixLMPerExample(Mask):
    """:class:`PrefixLM` with a per-example prefix ``lengths [B]`` (data: built on device)."""

    lengths: Any

    def __call__(self, b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < self.lengths[b])

    def row_intervals(self, b, h, q_idx, kv_idx):
        last = jnp.maximum(q_idx[None, :], jnp.asarray(self.lengths)[b][:, None] - 1)  # [Bm, Tq]
        return 0, _count_le(kv_idx, last)[:, None, :], True


def prefix_lm(prefix: int | Any) -> Mask:
    """Prefix-LM (Raffel et al. 2020): bidirectional over the prefix, causal after it.

    ``prefix`` is an int, or an int array ``[B]`` of per-example prefix lengths.
    """
    if isinstance(prefix, int | np.integer) and not isinstance(prefix, bool):
        return PrefixLM(_int("prefix", prefix))
    arr = jnp.asarray(prefix)
    if arr.ndim != 1 or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(
            f"prefix must be an int or an int array [batch]; got {arr.shape} {arr.dtype}"
        )
    return PrefixLMPerExample(arr.astype(jnp.int32))


@_pytree("mask")
@dataclasses.dataclass(frozen=True)
class BoolMask(Mask):
    """A boolean array ``[B|1, N|1, Tq|1, Tk|1]`` as a mask mod (size-1 dims broadcast)."""

    mask: Any

    def __call__(self, b, h, q_idx, kv_idx):
        idx = (b, h, q_idx, kv_idx)
        zero = q_idx * 0 + kv_idx * 0  # keeps the index arrays' kind (NumPy or jax) and shape
        return self.mask[
            tuple(i if n > 1 else zero for i, n in zip(idx, self.mask.shape, strict=True))
        ]


def bool_mask(mask: Any, batch: int, heads: int, q_len: int, kv_len: int) -> BoolMask:
    """:class:`BoolMask` of a boolean ``mask`` broadcastable to ``[B, N, Tq, Tk]``.

    Lower ranks are right-aligned (``[Tq, Tk]`` is one mask for every row and
    head), as in ``jax.nn.dot_product_attention``.
    """
    m = jnp.asarray(mask)
    full = (batch, heads, q_len, kv_len)
    if m.dtype != jnp.bool_:
        raise ValueError(
            f"mask must be a boolean array (True: the pair is visible); got dtype {m.dtype} "
            "(Flax's float masks: use efficient_attn.nn.attention_fn, which converts them)"
        )
    shape = (1,) * (4 - m.ndim) + tuple(m.shape) if m.ndim <= 4 else None
    if shape is None or any(s not in (1, f) for s, f in zip(shape, full, strict=True)):
        raise ValueError(
            f"mask of shape {tuple(m.shape)} does not broadcast to [B, N, T, S]={full}"
        )
    return BoolMask(m.reshape(shape))


@_pytree("q_segment_ids", "kv_segment_ids")
@dataclasses.dataclass(frozen=True)
class Documents(Mask):
    """``q_segment_ids[b, q_idx] == kv_segment_ids[b, kv_idx]``."""

    q_segment_ids: Any
    kv_segment_ids: Any

    def __call__(self, b, h, q_idx, kv_idx):
        return self.q_segment_ids[b, q_idx] == self.kv_segment_ids[b, kv_idx]

    def row_intervals(self, b, h, q_idx, kv_idx):
        # Sorted ids (packed documents): the keys of query i's document are one run,
        # found by binary search; unsorted ids are not runs (exact=False).
        q_ids = jnp.asarray(self.q_segment_ids)[b][:, q_idx]  # [Bm, Tq]
        kv_ids = jnp.asarray(self.kv_segment_ids)[b][:, kv_idx]  # [Bm, Tk]
        search = jax.vmap(jnp.searchsorted, in_axes=(0, 0, None))
        lo, hi = search(kv_ids, q_ids, "left"), search(kv_ids, q_ids, "right")
        exact = jnp.all(q_ids[:, 1:] >= q_ids[:, :-1]) & jnp.all(kv_ids[:, 1:] >= kv_ids[:, :-1])
        return lo[:, None, :], hi[:, None, :], exact


def document_mask(q_segment_ids: Any, kv_segment_ids: Any = None) -> Documents:
    """Document masking over packed sequences: a query sees a key iff their segment ids agree.

    q_segment_ids: int ``[B, Tq]``; kv_segment_ids: int ``[B, Tk]`` (default:
    the same as the queries'). Combine with :func:`causal_mask` for packed
    causal LM training. Built on device inside ``jit``: new ids never retrace.
    """
    q = jnp.asarray(q_segment_ids)
    kv = q if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
    for name, x in (("q_segment_ids", q), ("kv_segment_ids", kv)):
        if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array [batch, seq]; got {x.shape} {x.dtype}")
    if q.shape[0] != kv.shape[0]:
        raise ValueError(f"segment ids disagree on batch: {q.shape[0]} vs {kv.shape[0]}")
    return Documents(q.astype(jnp.int32), kv.astype(jnp.int32))
