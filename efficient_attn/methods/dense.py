"""Dense softmax attention: the reference every other method is defined against.

Vaswani et al. 2017, "Attention Is All You Need": ``softmax(Q K^T * scale) V``,
with FlexAttention's ``mask_mod``/``score_mod`` evaluated on the whole
materialised score matrix (the plain formulation the tile engine is checked
against).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from efficient_attn import masking
from efficient_attn.parallel.kernels import flash_ring_kernels
from efficient_attn.registry import FEATURES, register_method


def _ring_kernels():
    """Ring kernels of ``dense``: the tile engine with one tile per pair of shards."""
    return flash_ring_kernels(block_q=2**30, block_k=2**30)


def dense_weights(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    mask_mod: Any = None,
    score_mod: Any = None,
) -> jax.Array:
    """Softmax weights ``[B, N, Tq, Tk]`` (float32, or float64 for float64 inputs).

    q: [B, Tq, N, H], k: [B, Tk, K, H]. GQA is computed on grouped queries;
    K/V are never repeated. Mods are evaluated on the whole ``[Tq, Tk]`` matrix.
    """
    b, tq, n, _ = q.shape
    tk, kh = k.shape[1], k.shape[2]
    acc = masking.stat_dtype(q.dtype)
    qg = masking.group_queries(q, kh)  # [B, Tq, K, G, H]
    logits = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=acc)
    logits = logits.astype(acc) * scale
    mask = masking.dense_mask(kv_lengths, b, tq, tk, causal=causal)[:, None, None]
    logits, mask = masking.apply_mods(logits, mask, mask_mod, score_mod)
    w = masking.safe_softmax(logits, mask)  # [B, K, G, Tq, Tk]
    return w.reshape(b, n, tq, tk)


@register_method("dense", exact=True, weights=dense_weights, supports=FEATURES, ring=_ring_kernels)
def dense(
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
) -> jax.Array:
    """Plain softmax attention with masks (Vaswani et al. 2017); O(Tq*Tk) memory.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    A ``block_mask`` only contributes its ``mask_mod`` (nothing is tiled here).
    """
    b, tq, n, _ = q.shape
    kh = k.shape[2]
    if mask_mod is None and block_mask is not None:
        mask_mod = block_mask.mask_mod
    w = dense_weights(
        q, k, causal=causal, kv_lengths=kv_lengths, scale=scale, mask_mod=mask_mod,
        score_mod=score_mod,
    )  # fmt: skip
    w = w.reshape(b, kh, n // kh, tq, -1).astype(v.dtype)
    if kv_lengths is not None:  # padding keys may hold anything (NaN): never multiply them
        valid = jnp.arange(k.shape[1])[None, :] < kv_lengths[:, None]
        v = jnp.where(valid[:, :, None, None], v, 0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", w, v, preferred_element_type=masking.stat_dtype(v.dtype))
    return masking.ungroup_heads(out).astype(q.dtype)
