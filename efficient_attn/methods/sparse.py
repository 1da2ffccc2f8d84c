"""Sparse attention as mask mods on the tile engine: sliding window, strided, BigBird.

Beltagy et al. 2020, "Longformer" and Jiang et al. 2023, "Mistral 7B" (sliding
window); Child et al. 2019, "Generating Long Sequences with Sparse Transformers"
(window plus summary columns); Zaheer et al. 2020, "Big Bird" (sliding, global
and random blocks).

Each method is defined once, by its ``mask_mod`` (:func:`method_mask`): its
``sparsity_pattern``, its explicit weights (dense softmax restricted to the
mask) and its execution (the block mask of that mod on the tile engine of
:mod:`efficient_attn.core.engine`: empty tiles skipped, full tiles unmasked) all
come from it, so work and memory grow with the pattern, not with ``Tq * Tk``.
``strided`` runs the engine twice and merges the two exactly: the window over
the keys in their order, and the summary keys outside the window gathered
into tiles of their own (the same mod evaluated at their positions).

Cross attention: query ``i`` sits at the aligned position ``a_i = i + Tk - Tq``
(bottom-right, like ``causal``); windows are measured from ``a_i``. User
``mask_mod``/``score_mod`` are ANDed with / applied on top of the pattern.

Defaults: ``local`` window 256 (256 keys per causal query); ``strided`` window
256 and stride 256 (Child et al. choose stride ~ sqrt(N); 256 suits N ~ 64k);
``bigbird`` blocks of 64 with 2 global and 3 random blocks (the paper's ITC
setting). Sequences shorter than a window or block are valid: the pattern is
then dense.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn import kernels
from efficient_attn.core import blockmask, engine, mods
from efficient_attn.core.merge import merge_attention
from efficient_attn.core.registry import FEATURES, register_method
from efficient_attn.methods.dense import dense_weights

#: Everything but a dense bias (a bias over all pairs would make a sparse method quadratic).
SPARSE_FEATURES = tuple(f for f in FEATURES if f != "bias")

#: Tile size (queries and keys) of the local and strided block masks.
TILE = 128


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


def window_mask(tq: int, tk: int, *, causal: bool, window: int) -> mods.Mask:
    """``|a_i - j| < window`` (causal: ``0 <= a_i - j < window``, exactly ``window`` keys)."""
    window = _check_int("window", window, 1)
    return mods.sliding_window(window - 1, 0 if causal else window - 1, offset=tk - tq)


def local_mask(tq: int, tk: int, *, causal: bool, window: int) -> mods.Mask:
    """The mask of ``local``: the sliding window."""
    return window_mask(tq, tk, causal=causal, window=window)


def strided_mask(tq: int, tk: int, *, causal: bool, window: int, stride: int) -> mods.Mask:
    """The mask of ``strided``: the window, or a summary key ``j % stride == stride - 1``
    (causal: only those with ``j <= a_i``)."""
    summary = mods.strided_summary(_check_int("stride", stride, 1))
    if causal:
        summary = mods.and_masks(summary, mods.causal_bottom_right(tq, tk))
    return mods.or_masks(window_mask(tq, tk, causal=causal, window=window), summary)


def bigbird_mask(
    tq: int, tk: int, *, causal: bool, block: int, num_global_blocks: int,
    num_random_blocks: int, seed: int,
) -> mods.Mask:  # fmt: skip
    """The mask of ``bigbird``: the bottom-right ``[Tq, Tk]`` corner of BigBird's block
    pattern of length ``max(Tq, Tk)`` (and the causal rule when causal)."""
    mask = mods.bigbird_mask(
        tq, tk, block=_check_int("block", block, 1), causal=causal,
        num_global_blocks=_check_int("num_global_blocks", num_global_blocks, 0),
        num_random_blocks=_check_int("num_random_blocks", num_random_blocks, 0),
        seed=_check_int("seed", seed, 0),
    )  # fmt: skip
    return mods.and_masks(mask, mods.causal_bottom_right(tq, tk)) if causal else mask


_MASKS = {"local": local_mask, "strided": strided_mask, "bigbird": bigbird_mask}


#: Options that choose how a method runs (the fused kernels), not its pattern.
_EXECUTION = ("implementation", "interpret")


def method_mask(method: str, tq: int, tk: int, *, causal: bool, **options: Any) -> mods.Mask:
    """The ``mask_mod`` that defines sparse ``method`` (options as the method's)."""
    options = {k: v for k, v in options.items() if k not in _EXECUTION}
    return _MASKS[method](tq, tk, causal=causal, **options)


def _pattern(method: str):
    def pattern(tq: int, tk: int, *, causal: bool, **options) -> np.ndarray:
        mod = method_mask(method, tq, tk, causal=causal, **options)
        return blockmask.block_mask(mod, tq, tk).dense()[0, 0]

    pattern.__name__ = f"{method}_pattern"
    pattern.__doc__ = f"Bool ``[Tq, Tk]``: the pairs ``{method}``'s mask lets interact."
    return pattern


def _weights(method: str):
    def weights(q, k, *, causal, kv_lengths, scale, mask_mod=None, score_mod=None, **options):
        mod = method_mask(method, q.shape[1], k.shape[1], causal=causal, **options)
        mask = mod if mask_mod is None else mods.and_masks(mod, mask_mod)
        return dense_weights(q, k, causal=causal, kv_lengths=kv_lengths, scale=scale,
                             mask_mod=mask, score_mod=score_mod)  # fmt: skip

    weights.__doc__ = f"[B, N, Tq, Tk] softmax weights restricted to ``{method}``'s mask."
    return weights


def _register(name: str):
    return register_method(
        name,
        exact=False,
        family="sparse",
        weights=_weights(name),
        pattern=_pattern(name),
        supports=SPARSE_FEATURES,
    )


def _no_block_mask(method: str, block_mask: Any) -> None:
    if block_mask is not None:
        raise ValueError(
            f"method {method!r} builds its block mask from its own pattern; pass mask_mod= "
            "(ANDed with the pattern) instead of block_mask="
        )


def _user(mask_mod):
    return [] if mask_mod is None else [mask_mod]


def _run(q, k, v, kv_lengths, scale, mask, tile, method, mask_mod, score_mod, block_mask,
         dropout, return_lse, **execution):  # fmt: skip
    _no_block_mask(method, block_mask)
    mask = mods.and_masks(mask, *_user(mask_mod))
    execution = {"implementation": "xla", **execution}  # local's options pick the kernels
    out_lse = kernels.attend(
        q, k, v, causal=False, kv_lengths=kv_lengths, scale=scale, block_q=tile, block_k=tile,
        mask_mod=mask, score_mod=score_mod, dropout=dropout, **execution,
    )  # fmt: skip
    return engine.result(out_lse, return_lse, q.dtype)


@_register("local")
def local(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_mask: Any = None,
    dropout: Any = None,
    return_lse: bool = False,
    window: int = 256,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Sliding-window attention (Longformer, Mistral), on ~window/tile key tiles per tile.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    Query ``i`` sees key ``j`` iff ``|a_i - j| < window``, with
    ``a_i = i + Tk - Tq``; causal: ``0 <= a_i - j < window`` (exactly
    ``window`` keys, Mistral's convention). Cost O(Tq * window).
    ``implementation``/``interpret``: the fused kernels, as for ``blockwise``.
    """
    mask = local_mask(q.shape[1], k.shape[1], causal=causal, window=window)
    return _run(q, k, v, kv_lengths, scale, mask, TILE, "local", mask_mod, score_mod, block_mask,
                dropout, return_lse, implementation=implementation,
                interpret=interpret)  # fmt: skip


@_register("strided")
def strided(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_mask: Any = None,
    dropout: Any = None,
    return_lse: bool = False,
    window: int = 256,
    stride: int = 256,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Sparse Transformer attention (Child et al. 2019): a window plus every stride-th key.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    The local window of :func:`local` plus the summary keys
    ``j % stride == stride - 1`` (the "fixed" pattern with one summary key per
    block of ``stride``). Cost O(Tq * (window + Tk / stride)): the summary keys
    are gathered into their own tiles.
    """
    _no_block_mask("strided", block_mask)
    tq, tk = q.shape[1], k.shape[1]
    mask = mods.and_masks(
        strided_mask(tq, tk, causal=causal, window=window, stride=stride), *_user(mask_mod)
    )
    window_mod = window_mask(tq, tk, causal=causal, window=window)
    kv_len = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    common = {"kv_len": kv_len, "scale": scale, "score_mod": score_mod, "dropout": dropout}
    bq, bk = min(TILE, tq), min(TILE, tk)
    near = engine.plan_block_mask(
        tq, tk, batch=q.shape[0], heads=q.shape[2], causal=False,
        mask_mod=mods.and_masks(mask, window_mod), block_q=bq, block_k=bk,
    )  # fmt: skip
    out, lse = engine.tiled_attention(q, k, v, block_mask=near, **common)
    summary = np.arange(stride - 1, tk, stride, dtype=np.int32)
    if summary.size == 0:
        return engine.result((out, lse), return_lse, q.dtype)
    far_mod = mods.and_masks(mask, mods.invert_mask(window_mod))
    bs = min(TILE, summary.size)
    far = blockmask.build(
        far_mod, blockmask.positions(tq), summary, q_limit=tq, k_limit=tk,
        batch=q.shape[0], heads=q.shape[2], block_q=bq, block_k=bs, infer=True,
    )  # fmt: skip
    out2, lse2 = engine.tiled_attention(
        q, k[:, summary], v[:, summary], block_mask=far, k_pos=summary, k_limit=tk, **common
    )
    return engine.result(merge_attention((out, out2), (lse, lse2)), return_lse, q.dtype)


@_register("bigbird")
def bigbird(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_mask: Any = None,
    dropout: Any = None,
    return_lse: bool = False,
    block: int = 64,
    num_global_blocks: int = 2,
    num_random_blocks: int = 3,
    seed: int = 0,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """BigBird block-sparse attention (Zaheer et al. 2020): sliding, global and random blocks.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    Blocks of ``block`` positions; see :func:`efficient_attn.core.mods.bigbird_blocks`
    for the block pattern (deterministic for ``seed``). Tiles are BigBird's
    blocks. Cost O(Tq * block * (3 + g + r)) plus O(g * block * Tk) for the
    global rows.
    """
    mask = bigbird_mask(
        q.shape[1], k.shape[1], causal=causal, block=block, num_global_blocks=num_global_blocks,
        num_random_blocks=num_random_blocks, seed=seed,
    )  # fmt: skip
    return _run(q, k, v, kv_lengths, scale, mask, block, "bigbird", mask_mod, score_mod,
                block_mask, dropout, return_lse)  # fmt: skip
