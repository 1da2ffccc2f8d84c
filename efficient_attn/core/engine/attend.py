"""What every tiled method runs: its arguments to a block mask, then the engine.

``causal``, a sparse method's pattern and the user's ``mask_mod`` / block mask
(Dong et al. 2024, "FlexAttention") are combined into the one block mask the
engine runs over.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from efficient_attn.core import blockmask as _bm
from efficient_attn.core import masking
from efficient_attn.core import mods as _mods
from efficient_attn.core.engine.score import DOT, Score
from efficient_attn.core.engine.tiled import tiled_attention


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # mods holding arrays compare elementwise: treat as different
        return False


def plan_block_mask(
    tq: int,
    tk: int,
    *,
    batch: int,
    heads: int,
    causal: bool,
    mask_mod: Any = None,
    block_mask: _bm.BlockMask | None = None,
    block_q: int,
    block_k: int,
    pattern: Any = None,
) -> _bm.BlockMask:
    """The block mask one call runs over: ``causal``, a method's ``pattern`` and the user's mask.

    With ``block_mask`` (built by the user, reused across layers) the static
    parts (causal, pattern) are ANDed into its classification; otherwise one
    block mask of everything is built, depending on batch and heads only where
    the mods read those indices.
    """
    mods = _mods
    required = [m for m in (mods.causal_bottom_right(tq, tk) if causal else None, pattern) if m]
    if block_mask is not None:
        bm = _bm.check_block_mask(block_mask, tq, tk, batch, heads)
        if mask_mod is not None and not _same(mask_mod, bm.mask_mod):
            raise ValueError(
                "mask_mod differs from the mask_mod block_mask was built from; pass one of them "
                "(or ea.block_mask(mask_mod, ...) of this mask_mod)"
            )
        if required:
            extra = mods.and_masks(*required) if len(required) > 1 else required[0]
            bm = _bm.and_block_masks(bm, _bm.block_mask(extra, tq, tk, block_q=bm.block_q,
                                                        block_k=bm.block_k))  # fmt: skip
        return bm
    parts = [*required, *([mask_mod] if mask_mod is not None else [])]
    mod = mods.full_mask() if not parts else parts[0] if len(parts) == 1 else mods.and_masks(*parts)
    return _bm.build_inferred(mod, tq, tk, batch=batch, heads=heads, block_q=block_q,
                              block_k=block_k)  # fmt: skip


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: Any,
    block_q: int,
    block_k: int,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_mask: _bm.BlockMask | None = None,
    pattern: Any = None,
    score: Score = DOT,
    params: Any = None,
    bias: jax.Array | None = None,
    dropout: masking.Dropout | None = None,
    bwd_tiles: tuple[int, int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """What every tiled method runs: its arguments to a block mask, then the engine.

    q: [B, Tq, N, D], k: [B, Tk, K, D], v: [B, Tk, K, Hv] -> ``(out [B, Tq,
    N, Hv], lse [B, Tq, N])``. ``pattern``: the method's own ``mask_mod``
    (sparse methods), ANDed with ``causal`` and the user's ``mask_mod``.
    Tiles of ``block_q x block_k`` (clipped to the lengths) unless
    ``block_mask`` fixes them; ``bwd_tiles``: the backward's own ``(block_q,
    block_k)`` (None: the forward's; ignored with a ``block_mask``). This is the XLA
    engine; the fused Pallas kernels are chosen one layer up
    (:func:`efficient_attn.kernels.attend`).
    """
    b, tq, n = q.shape[:3]
    tk = k.shape[1]
    bm = plan_block_mask(
        tq, tk, batch=b, heads=n, causal=causal, mask_mod=mask_mod, block_mask=block_mask,
        block_q=min(block_q, tq), block_k=min(block_k, tk), pattern=pattern,
    )  # fmt: skip
    bwd = None
    if bwd_tiles is not None and block_mask is None:
        tiles = (min(bwd_tiles[0], tq), min(bwd_tiles[1], tk))
        if tiles != (bm.block_q, bm.block_k):
            bwd = plan_block_mask(
                tq, tk, batch=b, heads=n, causal=causal, mask_mod=mask_mod, block_q=tiles[0],
                block_k=tiles[1], pattern=pattern,
            )  # fmt: skip
    kv_len = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    return tiled_attention(
        q, k, v, scale=scale, block_mask=bm, kv_len=kv_len, score_mod=score_mod, score=score,
        params=params, bias=bias, dropout=dropout, bwd_block_mask=bwd,
    )  # fmt: skip
