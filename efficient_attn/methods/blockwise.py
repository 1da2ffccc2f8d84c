"""Blockwise (flash-style) exact attention in pure JAX, O(N) memory forward and backward.

Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory"; Dao 2023,
"FlashAttention-2". The tiled engine (online softmax, tile skipping, custom
backward) lives in :mod:`efficient_attn.flash`; this method runs it with the
dot-product score.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn import masking
from efficient_attn.flash import DOT, flash_attention
from efficient_attn.registry import positive_int, register_method


@register_method("blockwise", exact=True)
def blockwise(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    block_q: int = 512,
    block_k: int = 256,
) -> jax.Array:
    """Memory-efficient exact attention (Rabe & Staats 2021; FlashAttention-2 online softmax).

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    Any lengths (tiles are padded and masked internally); tiles of
    ``block_q`` queries and ``block_k`` keys (clipped to the sequence length).
    """
    block_q, block_k = positive_int("block_q", block_q), positive_int("block_k", block_k)
    b, tq = q.shape[:2]
    tk = k.shape[1]
    kv_len = masking.full_kv_lengths(kv_lengths, b, tk)
    scale = jnp.asarray(scale, masking.stat_dtype(q.dtype))
    return flash_attention(
        q, k, v, kv_len, scale, None, causal, min(block_q, tq), min(block_k, tk), DOT
    )
