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

from efficient_attn.core import masking
from efficient_attn.core.engine.ring import flash_ring_kernels
from efficient_attn.core.registry import FEATURES, register_method


def _ring_kernels():
    """Ring kernels of ``dense``: the tile engine with one tile per pair of shards."""
    return flash_ring_kernels(block_q=2**30, block_k=2**30)


def _grouped_logits(q, k, *, causal, kv_lengths, scale, mask_mod, score_mod, bias):
    """Scaled, biased, modded logits ``[B, K, G, Tq, Tk]`` and their visibility mask."""
    b, tq, n, _ = q.shape
    tk, kh = k.shape[1], k.shape[2]
    acc = masking.stat_dtype(q.dtype)
    qg = masking.group_queries(q, kh)  # [B, Tq, K, G, H]
    logits = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=acc)
    logits = logits.astype(acc) * scale
    if bias is not None:
        bias = masking.check_bias(bias, b, n, tq, tk).astype(acc)
        bias = jnp.broadcast_to(bias, (bias.shape[0], n, tq, tk))
        logits = logits + bias.reshape(bias.shape[0], kh, n // kh, tq, tk)
    mask = masking.dense_mask(kv_lengths, b, tq, tk, causal=causal)[:, None, None]
    return masking.apply_mods(logits, mask, mask_mod, score_mod)


def dense_weights(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    mask_mod: Any = None,
    score_mod: Any = None,
    bias: jax.Array | None = None,
) -> jax.Array:
    """Softmax weights ``[B, N, Tq, Tk]`` (float32, or float64 for float64 inputs).

    q: [B, Tq, N, H], k: [B, Tk, K, H]; bias broadcastable to ``[B, N, Tq,
    Tk]``. GQA is computed on grouped queries; K/V are never repeated. Mods
    are evaluated on the whole ``[Tq, Tk]`` matrix.
    """
    b, tq, n, _ = q.shape
    logits, mask = _grouped_logits(
        q, k, causal=causal, kv_lengths=kv_lengths, scale=scale, mask_mod=mask_mod,
        score_mod=score_mod, bias=bias,
    )  # fmt: skip
    return masking.safe_softmax(logits, mask).reshape(b, n, tq, -1)


@register_method(
    "dense", exact=True, family="full", weights=dense_weights, supports=FEATURES, ring=_ring_kernels
)
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
    bias: jax.Array | None = None,
    dropout: masking.Dropout | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Plain softmax attention with masks (Vaswani et al. 2017); O(Tq*Tk) memory.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv]
    (and lse [B, Tq, N] with ``return_lse``). A ``block_mask`` only
    contributes its ``mask_mod`` (nothing is tiled here); ``dropout`` is
    applied to the materialised weights with the same counter-based mask as
    the tile engine's.
    """
    b, tq, n, _ = q.shape
    kh = k.shape[2]
    if mask_mod is None and block_mask is not None:
        mask_mod = block_mask.mask_mod
    logits, mask = _grouped_logits(
        q, k, causal=causal, kv_lengths=kv_lengths, scale=scale, mask_mod=mask_mod,
        score_mod=score_mod, bias=bias,
    )  # fmt: skip
    w = masking.safe_softmax(logits, mask)  # [B, K, G, Tq, Tk]
    if dropout is not None:
        w = dropout.apply(w, *masking.mod_indices(b, kh, n // kh, tq, k.shape[1]))
    w = w.astype(v.dtype)
    if kv_lengths is not None:  # padding keys may hold anything (NaN): never multiply them
        valid = jnp.arange(k.shape[1])[None, :] < kv_lengths[:, None]
        v = jnp.where(valid[:, :, None, None], v, 0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", w, v, preferred_element_type=masking.stat_dtype(v.dtype))
    out = masking.ungroup_heads(out).astype(q.dtype)
    if not return_lse:
        return out
    s = jnp.where(mask, logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    total = jnp.sum(jnp.exp(s - m[..., None]), axis=-1)  # [B, K, G, Tq]; 0 for empty rows
    lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return out, jnp.moveaxis(lse.reshape(b, n, tq), 1, 2)
