"""A library of ``mask_mod`` and ``score_mod`` functions (FlexAttention's programming model).

Dong et al. 2024, "FlexAttention: A Programming Model for Generating Optimized
Attention Kernels". A variant of attention is two small functions:

* ``mask_mod(b, h, q_idx, kv_idx) -> bool``: whether query ``q_idx`` of batch
  element ``b`` and query head ``h`` sees key ``kv_idx``;
* ``score_mod(score, b, h, q_idx, kv_idx) -> score``: a new logit from the
  scaled logit ``scale * q . k``.

Indices are absolute 0-based positions passed as broadcastable int32 arrays,
so mods are ordinary ``jnp`` expressions and may index arrays they close over
(segment ids, a bias table, per-head slopes); gradients reach those arrays.

Masks here are written with operators, so they evaluate on NumPy index
arrays too (static block masks are built without compiling anything). Every
mod here is a small frozen dataclass registered as a pytree: its
settings are static (hashable, so masks over indices only are built once and
cached) and its arrays are leaves (a :class:`efficient_attn.BlockMask` holding
a document mask can be passed into and returned from ``jax.jit``). Combine
masks with :func:`and_masks` / :func:`or_masks` (or ``&`` / ``|``) and scores
with :func:`chain_scores`. Plain functions and lambdas work everywhere too.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MaskMod = Callable[[Any, Any, Any, Any], Any]
ScoreMod = Callable[[Any, Any, Any, Any, Any], Any]


def _pytree(*data: str):
    """Register a frozen dataclass as a pytree: ``data`` fields are leaves, the rest static."""

    def wrap(cls):
        fields = [f.name for f in dataclasses.fields(cls)]
        meta = [f for f in fields if f not in data]
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=meta)

    return wrap


def _int(name: str, value: Any, minimum: int = 0) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


class Mask:
    """Base of the library's mask mods: callable ``(b, h, q_idx, kv_idx) -> bool``; ``&``, ``|``.

    A mask over positions only may also give :meth:`tile_bounds`, which lets a
    block mask classify most tiles without evaluating them.
    """

    def __call__(self, b, h, q_idx, kv_idx):
        raise NotImplementedError

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        """``(may, must)`` bool arrays over tiles spanning positions ``[q_lo, q_hi] x [k_lo, k_hi]``
        (NumPy, broadcastable): ``may`` False proves a tile empty, ``must`` True proves it full.
        None: no bounds (every tile is evaluated)."""
        return None

    def __and__(self, other: MaskMod) -> Mask:
        return and_masks(self, other)

    def __or__(self, other: MaskMod) -> Mask:
        return or_masks(self, other)


class Score:
    """Base of the library's score mods: callable ``(score, b, h, q_idx, kv_idx) -> score``."""

    def __call__(self, score, b, h, q_idx, kv_idx):
        raise NotImplementedError


# ---- combinators ---------------------------------------------------------------


@_pytree("mods")
@dataclasses.dataclass(frozen=True)
class _AndMasks(Mask):
    mods: tuple

    def __call__(self, b, h, q_idx, kv_idx):
        return functools.reduce(operator.and_, (m(b, h, q_idx, kv_idx) for m in self.mods))

    def tile_bounds(self, *span):
        bounds = [_bounds(m, span) for m in self.mods]
        return (
            functools.reduce(np.logical_and, (b[0] for b in bounds)),
            functools.reduce(np.logical_and, (b[1] for b in bounds)),
        )


@_pytree("mods")
@dataclasses.dataclass(frozen=True)
class _OrMasks(Mask):
    mods: tuple

    def __call__(self, b, h, q_idx, kv_idx):
        return functools.reduce(operator.or_, (m(b, h, q_idx, kv_idx) for m in self.mods))

    def tile_bounds(self, *span):
        bounds = [_bounds(m, span) for m in self.mods]
        return (
            functools.reduce(np.logical_or, (b[0] for b in bounds)),
            functools.reduce(np.logical_or, (b[1] for b in bounds)),
        )


def _bounds(mod, span):
    """``mod``'s tile bounds, or the trivial ones (may be visible, not proven full)."""
    b = mod.tile_bounds(*span) if isinstance(mod, Mask) else None
    return (np.True_, np.False_) if b is None else b


def _mods(kind: str, mods: tuple) -> tuple:
    if not mods or not all(callable(m) for m in mods):
        raise ValueError(f"{kind} needs one or more callables; got {mods!r}")
    return tuple(mods)


def and_masks(*mods: MaskMod) -> Mask:
    """A pair is visible iff every mask in ``mods`` allows it."""
    return _AndMasks(_mods("and_masks", mods))


def or_masks(*mods: MaskMod) -> Mask:
    """A pair is visible iff any mask in ``mods`` allows it."""
    return _OrMasks(_mods("or_masks", mods))


@_pytree("mods")
@dataclasses.dataclass(frozen=True)
class _ChainScores(Score):
    mods: tuple

    def __call__(self, score, b, h, q_idx, kv_idx):
        for m in self.mods:
            score = m(score, b, h, q_idx, kv_idx)
        return score


def chain_scores(*mods: ScoreMod) -> Score:
    """Apply the score mods in order (e.g. a bias, then a soft-cap)."""
    return _ChainScores(_mods("chain_scores", mods))


@_pytree("mod")
@dataclasses.dataclass(frozen=True)
class _Not(Mask):
    mod: Any

    def __call__(self, b, h, q_idx, kv_idx):
        return ~self.mod(b, h, q_idx, kv_idx)

    def tile_bounds(self, *span):
        may, must = _bounds(self.mod, span)
        return ~must, ~may


def invert_mask(mod: MaskMod) -> Mask:
    """The pairs ``mod`` hides."""
    return _Not(_mods("invert_mask", (mod,))[0])


# ---- masks over indices only ---------------------------------------------------


@_pytree()
@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every pair is visible (attention without a mask)."""

    def __call__(self, b, h, q_idx, kv_idx):
        return np.ones((), bool)

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        return np.True_, np.True_


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


@_pytree("lengths")
@dataclasses.dataclass(frozen=True)
class PrefixLMPerExample(Mask):
    """:class:`PrefixLM` with a per-example prefix ``lengths [B]`` (data: built on device)."""

    lengths: Any

    def __call__(self, b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < self.lengths[b])


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


def bigbird_blocks(
    nb: int, *, causal: bool, num_global_blocks: int, num_random_blocks: int, seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(is_global [nb], key blocks of each query block) of BigBird's block pattern.

    Global blocks: the first ``ceil(g/2)`` and last ``floor(g/2)`` blocks (causal:
    the first ``g``); they attend to and are attended by every block. Every
    other query block sees its neighbours ``b-1, b, b+1`` (causal: ``b-1, b``),
    the global blocks, and ``num_random_blocks`` other blocks drawn without
    replacement from the rest (causal: only from earlier blocks) by
    ``np.random.default_rng(seed)``.
    """
    g, r = num_global_blocks, num_random_blocks
    if causal:
        glob = np.arange(min(g, nb))
    else:
        glob = np.union1d(np.arange(min((g + 1) // 2, nb)), np.arange(max(nb - g // 2, 0), nb))
    is_global = np.zeros(nb, bool)
    is_global[glob] = True
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(nb):
        if is_global[b]:
            rows.append(np.arange(b + 1 if causal else nb))
            continue
        limit = b if causal else nb  # random blocks come from [0, limit)
        near = np.arange(max(b - 1, 0), min(b + (1 if causal else 2), nb))
        fixed = np.union1d(near, glob[glob < limit] if causal else glob)
        taken = fixed[fixed < limit]
        count = min(r, limit - taken.size)
        extra = rng.choice(limit - taken.size, size=count, replace=False) if count else []
        extra = np.sort(np.asarray(extra, np.int64))
        for f in taken:  # index among the free blocks -> block number
            extra = extra + (extra >= f)
        rows.append(np.union1d(fixed, extra))
    return is_global, rows


@functools.lru_cache(maxsize=32)
def _bigbird_table(nb: int, causal: bool, g: int, r: int, seed: int) -> np.ndarray:
    _, rows = bigbird_blocks(nb, causal=causal, num_global_blocks=g, num_random_blocks=r, seed=seed)
    table = np.zeros((nb, nb), bool)
    for i, row in enumerate(rows):
        table[i, row] = True
    table.setflags(write=False)
    return table


@_pytree()
@dataclasses.dataclass(frozen=True)
class BigBird(Mask):
    """BigBird's block pattern of length ``max(Tq, Tk)``, bottom-right aligned."""

    q_len: int
    kv_len: int
    block: int
    causal: bool
    num_global_blocks: int
    num_random_blocks: int
    seed: int

    def __call__(self, b, h, q_idx, kv_idx):
        length = max(self.q_len, self.kv_len)
        nb = -(-length // self.block)
        table = _bigbird_table(
            nb, self.causal, self.num_global_blocks, self.num_random_blocks, self.seed
        )
        xp = np if isinstance(q_idx, np.ndarray) and isinstance(kv_idx, np.ndarray) else jnp
        qb = (q_idx + (length - self.q_len)) // self.block
        kb = (kv_idx + (length - self.kv_len)) // self.block
        return xp.asarray(table)[xp.clip(qb, 0, nb - 1), xp.clip(kb, 0, nb - 1)]

    def tile_bounds(self, q_lo, q_hi, k_lo, k_hi):
        length = max(self.q_len, self.kv_len)
        nb = -(-length // self.block)
        table = _bigbird_table(
            nb, self.causal, self.num_global_blocks, self.num_random_blocks, self.seed
        )

        def blocks(lo, hi, shift):
            lo = np.clip((lo + shift) // self.block, 0, nb - 1)
            return lo, lo == np.clip((hi + shift) // self.block, 0, nb - 1)

        (qb, q_one), (kb, k_one) = (
            blocks(q_lo, q_hi, length - self.q_len),
            blocks(k_lo, k_hi, length - self.kv_len),
        )
        one = q_one & k_one  # the tile lies inside one block pair: exact
        hit = table[qb, kb]
        return hit | ~one, hit & one


def bigbird_mask(
    q_len: int,
    kv_len: int,
    *,
    block: int = 64,
    causal: bool = False,
    num_global_blocks: int = 2,
    num_random_blocks: int = 3,
    seed: int = 0,
) -> BigBird:
    """BigBird (Zaheer et al. 2020): sliding, global and random blocks of ``block`` positions.

    See :func:`bigbird_blocks` for the block
    pattern; ``causal`` draws the causal variant of it (combine with the causal
    rule for causal attention).
    """
    return BigBird(
        _int("q_len", q_len, 1), _int("kv_len", kv_len, 1), _int("block", block, 1),
        bool(causal), _int("num_global_blocks", num_global_blocks),
        _int("num_random_blocks", num_random_blocks), _int("seed", seed),
    )  # fmt: skip


# ---- score mods ----------------------------------------------------------------


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes ``2^(-8 i / n)``, i = 1..n (Press et al. 2022), float32 ``[N]``.

    For a head count that is not a power of two, the paper's interleaving of
    the next power of two's slopes.
    """
    n = _int("num_heads", num_heads, 1)

    def pow2(m):
        return [2.0 ** (-8.0 * (i + 1) / m) for i in range(m)]

    closest = 2 ** int(np.floor(np.log2(n)))
    slopes = pow2(closest) + pow2(2 * closest)[0::2][: n - closest]
    return np.asarray(slopes, np.float32)


@_pytree("slopes")
@dataclasses.dataclass(frozen=True)
class ALiBi(Score):
    """``score - slopes[h] * |q_idx + offset - kv_idx|``."""

    slopes: Any
    offset: int = 0

    def __call__(self, score, b, h, q_idx, kv_idx):
        dist = jnp.abs(q_idx + self.offset - kv_idx).astype(score.dtype)
        return score - self.slopes[h].astype(score.dtype) * dist


def alibi(slopes: Any, *, offset: int = 0) -> ALiBi:
    """ALiBi (Press et al. 2022, "Train Short, Test Long"): a linear distance penalty per head.

    ``slopes [N]`` (:func:`alibi_slopes`, or learned: gradients reach them).
    """
    s = jnp.asarray(slopes)
    if s.ndim != 1 or not jnp.issubdtype(s.dtype, jnp.floating):
        raise ValueError(f"slopes must be a float array [heads]; got {s.shape} {s.dtype}")
    return ALiBi(s, int(offset))


@_pytree()
@dataclasses.dataclass(frozen=True)
class SoftCap(Score):
    """``cap * tanh(score / cap)``."""

    cap: float

    def __call__(self, score, b, h, q_idx, kv_idx):
        cap = jnp.asarray(self.cap, score.dtype)
        return cap * jnp.tanh(score / cap)


def soft_cap(cap: float) -> SoftCap:
    """Tanh soft-capping of logits (Gemma 2; Grok): ``cap * tanh(score / cap)``."""
    if not isinstance(cap, int | float) or isinstance(cap, bool) or cap <= 0:
        raise ValueError(f"cap={cap!r} must be a positive number")
    return SoftCap(float(cap))


@_pytree("table")
@dataclasses.dataclass(frozen=True)
class RelativeBias(Score):
    """``score + table[h, clip(kv_idx - q_idx, -d, d) + d]`` with ``d = max_distance``."""

    table: Any
    max_distance: int

    def __call__(self, score, b, h, q_idx, kv_idx):
        d = self.max_distance
        rel = jnp.clip(kv_idx - q_idx, -d, d) + d
        return score + self.table[h, rel].astype(score.dtype)


def relative_position_bias(table: Any) -> RelativeBias:
    """A learned relative-position bias (Shaw et al. 2018; T5-style, unbucketed).

    ``table [N, 2 d + 1]``: the bias of head ``h`` at relative distance
    ``kv_idx - q_idx`` clipped to ``[-d, d]``. Gradients reach the table.
    """
    t = jnp.asarray(table)
    if t.ndim != 2 or t.shape[1] % 2 != 1 or not jnp.issubdtype(t.dtype, jnp.floating):
        raise ValueError(
            f"table must be a float array [heads, 2 * max_distance + 1]; got {t.shape} {t.dtype}"
        )
    return RelativeBias(t, (t.shape[1] - 1) // 2)


# ---- named variants (sweep axis values) ---------------------------------------------

#: Names usable as the ``mods`` axis of a sweep, with their parameter.
VARIANTS = {
    "none": "plain attention",
    "causal": "causal mask (top-left, self-attention)",
    "window": "causal sliding window of N keys: window:256",
    "documents": "N equal packed documents, causal: documents:16",
    "prefix": "prefix-LM with a prefix of N tokens: prefix:512",
    "alibi": "ALiBi with the paper's slopes, causal",
    "softcap": "tanh soft-cap C on the logits, causal: softcap:30",
}


def from_spec(spec: str, q_len: int, kv_len: int, heads: int) -> tuple[Any, Any]:
    """``(mask_mod, score_mod)`` of a named variant such as ``"window:256"`` (see :data:`VARIANTS`).

    Data-dependent variants (``documents``) return mods over arrays, so a sweep
    measures the on-device block-mask build too.
    """
    name, _, arg = str(spec).partition(":")
    if name not in VARIANTS:
        raise ValueError(f"unknown mods variant {spec!r}; valid: {', '.join(VARIANTS)}")
    needs_arg = name in ("window", "documents", "prefix", "softcap")
    if needs_arg != bool(arg):
        raise ValueError(f"mods variant {spec!r}: {VARIANTS[name]}")
    try:
        value = float(arg) if name == "softcap" else int(arg) if arg else 0
    except ValueError:
        raise ValueError(f"mods variant {spec!r}: {VARIANTS[name]}") from None
    causal = causal_bottom_right(q_len, kv_len)
    if name == "none":
        return None, None
    if name == "causal":
        return causal, None
    if name == "window":
        return sliding_window(_int("window", value, 1) - 1, offset=kv_len - q_len), None
    if name == "documents":
        docs = _int("documents", value, 1)
        seg = (np.arange(max(q_len, kv_len)) * docs // max(q_len, kv_len)).astype(np.int32)
        q_seg, kv_seg = seg[None, -q_len:], seg[None, -kv_len:]
        return document_mask(q_seg, kv_seg) & causal, None
    if name == "prefix":
        return prefix_lm(_int("prefix", value)), None
    if name == "alibi":
        return causal, alibi(alibi_slopes(heads), offset=kv_len - q_len)
    return causal, soft_cap(value)
