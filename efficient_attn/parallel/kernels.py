"""Inner kernels of ring attention: exact attention of a query shard over one key shard.

A ring kernel works on explicit token positions and returns the partial
output with its float32 log-sum-exp, so partial results over disjoint key
shards merge exactly (Milakov & Gimelshein 2018, online softmax). Its
backward takes the *global* output and log-sum-exp and returns this key
shard's contribution to the gradients (FlashAttention-2 backward, Dao 2023).

Positions: query at position ``p`` sees key at position ``r`` iff
``r < kv_len[b]`` and, when causal, ``r <= p``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from efficient_attn import flash as _flash
from efficient_attn import masking
from efficient_attn.registry import get_method, positive_int


def _mask(q_pos, k_pos, kv_len, causal):
    """Boolean ``[B, 1, 1, Tq, Tk]`` of visible pairs."""
    mask = masking.visible(
        q_pos[None, :, None], k_pos[None, None, :], kv_len[:, None, None], causal=causal, offset=0
    )
    return mask[:, None, None]


def dense_forward(q, k, v, q_pos, k_pos, kv_len, scale, *, causal: bool):
    """Materialised ``(out [B,Tq,N,Hv], lse [B,Tq,N])``; lse is -inf for rows that see no key.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv]; q_pos: int [Tq],
    k_pos: int [Tk], kv_len: int [B].
    """
    acc = masking.stat_dtype(q.dtype)
    b, tq, n, _ = q.shape
    qg = masking.group_queries(q, k.shape[2])  # [B, Tq, K, G, H]
    s = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=acc) * scale
    s = jnp.where(_mask(q_pos, k_pos, kv_len, causal), s, -jnp.inf)
    m = s.max(-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m[..., None])
    l = p.sum(-1)  # [B, K, G, Tq]
    nonempty = l > 0
    p = p / jnp.where(nonempty, l, 1.0)[..., None]
    out = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=acc)
    lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)
    lse = jnp.moveaxis(lse, 3, 1).reshape(b, tq, n)
    return masking.ungroup_heads(out).astype(q.dtype), lse


def dense_backward(q, k, v, q_pos, k_pos, kv_len, scale, out, lse, dout, *, causal: bool):
    """``(dq, dk, dv, dscale)`` of this key shard given the global ``out`` and ``lse``."""
    acc = masking.stat_dtype(q.dtype)
    kh = k.shape[2]
    qg = masking.group_queries(q, kh)  # [B, Tq, K, G, H]
    dog = masking.group_queries(dout.astype(acc), kh)  # [B, Tq, K, G, Hv]
    s_raw = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=acc)
    lse_g = jnp.moveaxis(masking.group_queries(lse[..., None], kh)[..., 0], 1, 3)  # [B,K,G,Tq]
    mask = _mask(q_pos, k_pos, kv_len, causal)
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s_raw * scale - lse_g[..., None], 0.0)), 0.0)
    delta = jnp.sum(masking.group_queries(out.astype(acc), kh) * dog, axis=-1)  # [B,Tq,K,G]
    dv = jnp.einsum("bkgqs,bqkgd->bskd", p, dog)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", dog, v.astype(acc))
    ds = p * (dp - jnp.moveaxis(delta, 1, 3)[..., None])  # d loss / d (scale * s_raw)
    dq = masking.ungroup_heads(jnp.einsum("bkgqs,bskh->bqkgh", ds, k.astype(acc)) * scale)
    dk = jnp.einsum("bkgqs,bqkgh->bskh", ds, qg.astype(acc)) * scale
    dscale = jnp.sum(ds * s_raw)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dscale


def _blockwise_kernels(block_q: int = 512, block_k: int = 256):
    positive_int("block_q", block_q)
    positive_int("block_k", block_k)

    def blocks(tq, tk, zigzag):
        # Tiles no longer than a zigzag chunk, so causal tile skipping stays effective.
        lq, lk = (tq // 2, tk // 2) if zigzag else (tq, tk)
        return {"block_q": min(block_q, max(lq, 1)), "block_k": min(block_k, max(lk, 1))}

    def forward(q, k, v, q_pos, k_pos, kv_len, scale, *, causal, zigzag=False):
        kw = blocks(q.shape[1], k.shape[1], zigzag)
        return _flash.flash_forward(q, k, v, q_pos, k_pos, kv_len, scale, causal=causal, **kw)

    def backward(q, k, v, q_pos, k_pos, kv_len, scale, out, lse, dout, *, causal, zigzag=False):
        kw = blocks(q.shape[1], k.shape[1], zigzag)
        return _flash.flash_backward(
            q, k, v, q_pos, k_pos, kv_len, scale, out, lse, dout, causal=causal, **kw
        )[:4]  # (dq, dk, dv, dscale): the dot score has no params

    return forward, backward


def _dense_kernels():
    def forward(q, k, v, q_pos, k_pos, kv_len, scale, *, causal, zigzag=False):
        return dense_forward(q, k, v, q_pos, k_pos, kv_len, scale, causal=causal)

    def backward(q, k, v, q_pos, k_pos, kv_len, scale, out, lse, dout, *, causal, zigzag=False):
        return dense_backward(q, k, v, q_pos, k_pos, kv_len, scale, out, lse, dout, causal=causal)

    return forward, backward


#: Registered exact method -> factory(**options) returning (forward, backward) ring kernels.
RING_KERNELS: Mapping[str, Callable[..., tuple[Callable, Callable]]] = {
    "blockwise": _blockwise_kernels,
    "dense": _dense_kernels,
}


@dataclasses.dataclass(frozen=True)
class RingKernel:
    """A method's (out, lse) kernel pair with its resolved options (hashable)."""

    method: str
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def resolve(cls, method: str, options: Mapping[str, Any]) -> RingKernel:
        """Look ``method`` up; approximate methods and exact ones without a kernel raise."""
        spec = get_method(method)
        valid = ", ".join(sorted(RING_KERNELS))
        if not spec.exact:
            raise ValueError(
                f"strategy='ring' needs an exact method; {method!r} is approximate "
                f"(use strategy='all_to_all' for it). Ring methods: {valid}"
            )
        if method not in RING_KERNELS:
            raise ValueError(
                f"method {method!r} has no (out, lse) kernel for strategy='ring'; "
                f"ring methods: {valid} (strategy='all_to_all' runs any method)"
            )
        opts = spec.resolve_options(options)
        kernel = cls(method, tuple(sorted(opts.items())))
        kernel.kernels()  # validates option values now, not inside shard_map
        return kernel

    def kernels(self) -> tuple[Callable, Callable]:
        return RING_KERNELS[self.method](**dict(self.options))


def ring_methods() -> tuple[str, ...]:
    """Methods usable as the inner computation of ``strategy='ring'``."""
    return tuple(RING_KERNELS)
