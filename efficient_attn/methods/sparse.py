"""Sparse attention executed block-sparsely: sliding window, strided, BigBird.

Beltagy et al. 2020, "Longformer" and Jiang et al. 2023, "Mistral 7B" (sliding
window); Child et al. 2019, "Generating Long Sequences with Sparse Transformers"
(window plus summary columns); Zaheer et al. 2020, "Big Bird" (sliding, global
and random blocks).

Each method is written twice. ``*_pattern`` is the definition: a NumPy bool
``[Tq, Tk]`` of the pairs that interact; dense softmax restricted to it is the
reference and the explicit weights. ``*_plan`` is the execution: a
:class:`efficient_attn.blocksparse.Plan` whose tile table lists only the key
tiles each query tile needs, so work and memory grow with the pattern's size,
not with ``Tq * Tk``.

Cross attention: query ``i`` sits at the aligned position ``a_i = i + Tk - Tq``
(bottom-right, like ``causal``); windows are measured from ``a_i``.

Defaults: ``local`` window 256 (256 keys per causal query); ``strided`` window
256 and stride 256 (Child et al. choose stride ~ sqrt(N); 256 suits N ~ 64k);
``bigbird`` blocks of 64 with 2 global and 3 random blocks (the paper's ITC
setting).
Sequences shorter than a window or block are valid: the pattern is then dense.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn import blocksparse, masking
from efficient_attn.registry import register_method

#: Tile size (queries and keys) of the local and strided plans.
TILE = 128


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


def _weights(pattern_fn):
    """Explicit-weights function of a pattern: dense softmax restricted to it."""

    def weights(q, k, *, causal: bool, kv_lengths, scale: float, **options) -> jax.Array:
        b, tq, n, _ = q.shape
        tk, kh = k.shape[1], k.shape[2]
        pattern = jnp.asarray(pattern_fn(tq, tk, causal=causal, **options))  # [Tq, Tk]
        acc = masking.stat_dtype(q.dtype)
        qg = masking.group_queries(q, kh)  # [B, Tq, K, G, H]
        logits = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=acc) * scale
        mask = masking.dense_mask(kv_lengths, b, tq, tk, causal=causal) & pattern
        return masking.safe_softmax(logits, mask[:, None, None]).reshape(b, n, tq, tk)

    weights.__doc__ = f"[B, N, Tq, Tk] softmax weights restricted to ``{pattern_fn.__name__}``."
    return weights


def _run(q, k, v, kv_lengths, scale, plan: blocksparse.Plan) -> jax.Array:
    kv_len = masking.full_kv_lengths(kv_lengths, q.shape[0], k.shape[1])
    return blocksparse.attend(q, k, v, kv_len, scale, plan)


def _keys(tk: int, bk: int) -> np.ndarray:
    """Slot positions of the keys in their own order, padded to tiles with -1."""
    pos = np.arange(masking.cdiv(tk, bk) * bk)
    return np.where(pos < tk, pos, -1)


# ---- local: sliding window ----------------------------------------------------


def _in_window(d, window: int, causal: bool):
    """``d = a_i - j``: within the window (NumPy or JAX arrays)."""
    if causal:
        return (d >= 0) & (d < window)
    return (d > -window) & (d < window)


def local_pattern(tq: int, tk: int, *, causal: bool, window: int) -> np.ndarray:
    """Query ``i`` sees key ``j`` iff ``|a_i - j| < window`` (causal: ``0 <= a_i - j < window``)."""
    window = _check_int("window", window, 1)
    d = np.arange(tq)[:, None] + (tk - tq) - np.arange(tk)[None, :]
    return _in_window(d, window, causal)


@dataclasses.dataclass(frozen=True)
class _WindowRule:
    """Slots below ``summary_from`` are keys in the window; later slots are summary keys
    outside it (and, when causal, not in the future)."""

    window: int
    causal: bool
    offset: int
    summary_from: int

    def __call__(self, q_idx, k_pos, slot):
        d = q_idx + self.offset - k_pos
        window = _in_window(d, self.window, self.causal)
        summary = ~window & (d >= 0) if self.causal else ~window
        return jnp.where(slot < self.summary_from, window, summary)


def _query_spans(tq: int, tk: int, bq: int) -> tuple[np.ndarray, np.ndarray]:
    """Aligned positions of the first and last query of each query tile."""
    i = np.arange(masking.cdiv(tq, bq))
    return i * bq + tk - tq, np.minimum((i + 1) * bq, tq) - 1 + tk - tq


def _window_tiles(tq, tk, bq, bk, window, causal) -> tuple[np.ndarray, np.ndarray]:
    """(query tile, key tile) pairs covering every window: a contiguous range per query tile."""
    first, last = _query_spans(tq, tk, bq)
    lo = np.maximum(first - window + 1, 0)
    hi = np.minimum(last if causal else last + window - 1, tk - 1)
    lo_t = lo // bk
    n = np.where(hi >= lo, hi // bk - lo_t + 1, 0)
    qi = np.repeat(np.arange(n.size), n)
    kj = lo_t[qi] + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    return qi, kj


def local_plan(
    tq: int, tk: int, *, causal: bool, window: int, tile: int = TILE
) -> blocksparse.Plan:
    """Block-sparse plan of :func:`local_pattern`: O(Tq * (window + tile)) work."""
    window = _check_int("window", window, 1)
    return _local_plan(tq, tk, bool(causal), window, _check_int("tile", tile, 1))


@functools.lru_cache(maxsize=64)
def _local_plan(tq: int, tk: int, causal: bool, window: int, tile: int) -> blocksparse.Plan:
    bq, bk = min(tile, tq), min(tile, tk)
    slot_pos = _keys(tk, bk)
    pairs = _window_tiles(tq, tk, bq, bk, window, causal)
    rule = _WindowRule(window, causal, tk - tq, slot_pos.size)
    return blocksparse.Plan.build(tq, bq, bk, slot_pos, pairs, rule)


@register_method("local", exact=False, weights=_weights(local_pattern), pattern=local_pattern)
def local(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    window: int = 256,
) -> jax.Array:
    """Sliding-window attention (Longformer, Mistral), executed on ~window/tile key tiles per tile.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    Query ``i`` sees key ``j`` iff ``|a_i - j| < window``, with
    ``a_i = i + Tk - Tq``; causal: ``0 <= a_i - j < window`` (exactly
    ``window`` keys, Mistral's convention). Cost O(Tq * window).
    """
    plan = local_plan(q.shape[1], k.shape[1], causal=causal, window=window)
    return _run(q, k, v, kv_lengths, scale, plan)


# ---- strided: window plus summary columns (Sparse Transformer) -----------------


def strided_pattern(tq: int, tk: int, *, causal: bool, window: int, stride: int) -> np.ndarray:
    """:func:`local_pattern` plus the summary keys ``j % stride == stride - 1``
    (causal: only those with ``j <= a_i``)."""
    stride = _check_int("stride", stride, 1)
    pattern = local_pattern(tq, tk, causal=causal, window=window)
    summary = np.broadcast_to(np.arange(tk)[None, :] % stride == stride - 1, (tq, tk))
    if causal:
        summary = summary & (np.arange(tk)[None, :] <= np.arange(tq)[:, None] + tk - tq)
    return pattern | summary


def strided_plan(
    tq: int, tk: int, *, causal: bool, window: int, stride: int, tile: int = TILE
) -> blocksparse.Plan:
    """Block-sparse plan of :func:`strided_pattern`: window tiles plus gathered summary keys.

    The ``Tk // stride`` summary keys are gathered into their own tiles after
    the regular keys, so the cost is O(Tq * (window + Tk / stride)); in-tile,
    summary slots exclude keys already in the window.
    """
    window, stride = _check_int("window", window, 1), _check_int("stride", stride, 1)
    return _strided_plan(tq, tk, bool(causal), window, stride, _check_int("tile", tile, 1))


@functools.lru_cache(maxsize=64)
def _strided_plan(
    tq: int, tk: int, causal: bool, window: int, stride: int, tile: int
) -> blocksparse.Plan:
    bq, bk = min(tile, tq), min(tile, tk)
    regular = _keys(tk, bk)
    qi, kj = _window_tiles(tq, tk, bq, bk, window, causal)
    ns = tk // stride
    summary = np.full(masking.cdiv(ns, bk) * bk, -1)
    summary[:ns] = np.arange(ns) * stride + stride - 1
    slot_pos = np.concatenate([regular, summary])
    if ns:
        tiles = summary.reshape(-1, bk)
        s_first, s_last = tiles[:, 0], tiles.max(axis=1)
        q_first, q_last = _query_spans(tq, tk, bq)
        need = s_first[None, :] <= q_last[:, None] - window
        if not causal:
            need |= s_last[None, :] >= q_first[:, None] + window
        si, sj = np.nonzero(need)
        qi, kj = np.concatenate([qi, si]), np.concatenate([kj, regular.size // bk + sj])
    rule = _WindowRule(window, causal, tk - tq, regular.size)
    return blocksparse.Plan.build(tq, bq, bk, slot_pos, (qi, kj), rule)


@register_method("strided", exact=False, weights=_weights(strided_pattern), pattern=strided_pattern)
def strided(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    window: int = 256,
    stride: int = 256,
) -> jax.Array:
    """Sparse Transformer attention (Child et al. 2019): a window plus every stride-th key.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    The local window of :func:`local` plus the summary keys
    ``j % stride == stride - 1`` (the "fixed" pattern with one summary key per
    block of ``stride``). Cost O(Tq * (window + Tk / stride)).
    """
    plan = strided_plan(q.shape[1], k.shape[1], causal=causal, window=window, stride=stride)
    return _run(q, k, v, kv_lengths, scale, plan)


# ---- bigbird: sliding, global and random blocks ------------------------------


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


def _bigbird_options(block, num_global_blocks, num_random_blocks, seed) -> dict:
    return {
        "block": _check_int("block", block, 1),
        "num_global_blocks": _check_int("num_global_blocks", num_global_blocks, 0),
        "num_random_blocks": _check_int("num_random_blocks", num_random_blocks, 0),
        "seed": _check_int("seed", seed, 0),
    }


def bigbird_pattern(
    tq: int,
    tk: int,
    *,
    causal: bool,
    block: int,
    num_global_blocks: int,
    num_random_blocks: int,
    seed: int,
) -> np.ndarray:
    """The bottom-right ``[Tq, Tk]`` corner of the block pattern of length ``max(Tq, Tk)``."""
    o = _bigbird_options(block, num_global_blocks, num_random_blocks, seed)
    length = max(tq, tk)
    nb = masking.cdiv(length, block)
    _, rows = bigbird_blocks(
        nb,
        causal=causal,
        num_global_blocks=o["num_global_blocks"],
        num_random_blocks=o["num_random_blocks"],
        seed=o["seed"],
    )
    blocks = np.zeros((nb, nb), bool)
    for b, row in enumerate(rows):
        blocks[b, row] = True
    full = np.repeat(np.repeat(blocks, block, 0), block, 1)[:length, :length]
    pattern = full[length - tq :, length - tk :]
    if causal:
        pattern = pattern & np.tril(np.ones((tq, tk), bool), k=tk - tq)
    return pattern


@dataclasses.dataclass(frozen=True)
class _CausalRule:
    """Inside a visited BigBird tile every pair interacts, up to the causal rule."""

    causal: bool
    offset: int

    def __call__(self, q_idx, k_pos, slot):
        if self.causal:
            return k_pos <= q_idx + self.offset
        return jnp.broadcast_to(True, (q_idx.shape[0], k_pos.shape[1]))


def bigbird_plan(
    tq: int,
    tk: int,
    *,
    causal: bool,
    block: int,
    num_global_blocks: int,
    num_random_blocks: int,
    seed: int,
) -> blocksparse.Plan:
    """Block-sparse plan of :func:`bigbird_pattern`: tiles are BigBird's blocks.

    Queries and keys are left-padded so their tiles align with the blocks of the
    length-``max(Tq, Tk)`` pattern.
    """
    o = _bigbird_options(block, num_global_blocks, num_random_blocks, seed)
    return _bigbird_plan(tq, tk, bool(causal), **o)


@functools.lru_cache(maxsize=64)
def _bigbird_plan(
    tq: int,
    tk: int,
    causal: bool,
    block: int,
    num_global_blocks: int,
    num_random_blocks: int,
    seed: int,
) -> blocksparse.Plan:
    length = max(tq, tk)
    nb = masking.cdiv(length, block)
    tile = min(block, length)
    q_blocks, q_left = divmod(length - tq, block)
    k_blocks, k_left = divmod(length - tk, block)
    slot_pos = np.full((nb - k_blocks) * tile, -1)
    slot_pos[k_left : k_left + tk] = np.arange(tk)
    _, rows = bigbird_blocks(
        nb,
        causal=causal,
        num_global_blocks=num_global_blocks,
        num_random_blocks=num_random_blocks,
        seed=seed,
    )
    rows = [row[row >= k_blocks] - k_blocks for row in rows[q_blocks:]]
    pairs = np.repeat(np.arange(len(rows)), [row.size for row in rows]), np.concatenate(rows)
    rule = _CausalRule(causal, tk - tq)
    return blocksparse.Plan.build(tq, tile, tile, slot_pos, pairs, rule, q_left=q_left)


@register_method("bigbird", exact=False, weights=_weights(bigbird_pattern), pattern=bigbird_pattern)
def bigbird(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    block: int = 64,
    num_global_blocks: int = 2,
    num_random_blocks: int = 3,
    seed: int = 0,
) -> jax.Array:
    """BigBird block-sparse attention (Zaheer et al. 2020): sliding, global and random blocks.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    Blocks of ``block`` positions; see :func:`bigbird_blocks` for the block
    pattern (deterministic for ``seed``). Cost O(Tq * block * (3 + g + r))
    plus O(g * block * Tk) for the global rows.
    """
    plan = bigbird_plan(
        q.shape[1],
        k.shape[1],
        causal=causal,
        block=block,
        num_global_blocks=num_global_blocks,
        num_random_blocks=num_random_blocks,
        seed=seed,
    )
    return _run(q, k, v, kv_lengths, scale, plan)
