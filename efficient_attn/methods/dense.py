"""Dense softmax attention: the reference every other method is defined against.

Vaswani et al. 2017, "Attention Is All You Need": ``softmax(Q K^T * scale) V``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn import masking
from efficient_attn.registry import register_method


def dense_weights(
    q: jax.Array, k: jax.Array, *, causal: bool, kv_lengths: jax.Array | None, scale: float
) -> jax.Array:
    """Softmax weights ``[B, N, Tq, Tk]`` (float32, or float64 for float64 inputs).

    q: [B, Tq, N, H], k: [B, Tk, K, H]. GQA is computed on grouped queries;
    K/V are never repeated.
    """
    b, tq, n, _ = q.shape
    tk, kh = k.shape[1], k.shape[2]
    acc = masking.stat_dtype(q.dtype)
    qg = masking.group_queries(q, kh)  # [B, Tq, K, G, H]
    logits = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=acc)
    logits = logits.astype(acc) * scale
    mask = masking.dense_mask(kv_lengths, b, tq, tk, causal=causal)[:, None, None]
    w = masking.safe_softmax(logits, mask)  # [B, K, G, Tq, Tk]
    return w.reshape(b, n, tq, tk)


@register_method("dense", exact=True, weights=dense_weights)
def dense(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
) -> jax.Array:
    """Plain softmax attention with masks (Vaswani et al. 2017); O(Tq*Tk) memory.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    """
    b, tq, n, _ = q.shape
    kh = k.shape[2]
    w = dense_weights(q, k, causal=causal, kv_lengths=kv_lengths, scale=scale)
    w = w.reshape(b, kh, n // kh, tq, -1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", w, v, preferred_element_type=masking.stat_dtype(v.dtype))
    return masking.ungroup_heads(out).astype(q.dtype)
