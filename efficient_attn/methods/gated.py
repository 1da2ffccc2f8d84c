"""Decay-gated linear attention, chunkwise: ``retnet``, ``mamba2``, ``gla``.

RetNet (Sun et al. 2023, "Retentive Network"), Mamba-2's SSD with a scalar
decay per head (Dao & Gu 2024, "Transformers are SSMs") and GLA (Yang et al.
2024, "Gated Linear Attention Transformers with Hardware-Efficient Training"):
``S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q'_t`` (see
:mod:`efficient_attn.methods.gated_base` for the definitions and options).

Chunkwise-parallel form (flash-linear-attention's ``chunk`` kernels): with
``b_i`` the cumulative log decay inside a chunk of ``C`` positions and ``S``
the state entering it,

    o_i = (q'_i * exp(b_i)) S + sum_{j <= i} (sum_h q'_ih k_jh exp(b_ih - b_jh)) v_j,
    S'  = exp(b_C) * S + sum_j (k_j * exp(b_C - b_j)) v_j^T.

Every exponent is ``<= 0`` (no overflow, whatever the decays). The
intra-chunk ``C x C`` matrices and the chunk contributions to the state are
computed for all chunks at once; only the chunk-boundary states are a
``jax.lax.scan``, so the backward pass stores ``T / C`` states. For ``gla``
(a decay per key channel) the intra-chunk weights need the ``[C, C, H]``
decays, computed a few chunks at a time (:func:`_channel_scores`); its default
chunk is smaller (16). Cost per head: ``O(T C H)`` time
(``O(T C H)`` exponentials for ``gla``) plus ``O(T H Hv)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.core import chunked
from efficient_attn.methods import gated_base as base

RETNET = base.Rule("retnet", decay="head", delta=False)
MAMBA2 = base.Rule("mamba2", decay="scalar", delta=False)
GLA = base.Rule("gla", decay="channel", delta=False)


def causal_decays(b: jax.Array) -> jax.Array:
    """``exp(b_i - b_j)`` for ``j <= i``, else 0: ``b [..., C, D] -> [..., C, C, D]``."""
    c = b.shape[-2]
    tril = jnp.tril(jnp.ones((c, c), bool))[:, :, None]
    diff = b[..., :, None, :] - b[..., None, :, :]
    return jnp.where(tril, jnp.exp(jnp.where(tril, diff, 0.0)), 0.0)


def _channel_scores(q: jax.Array, k: jax.Array, b: jax.Array, group: int = 8) -> jax.Array:
    """``a_ij = sum_h q_ih k_jh exp(b_ih - b_jh)`` (j <= i) per chunk: ``[B, K, G, nc, C, C]``.

    q: [B, K, G, nc, C, H], k, b: [B, K, nc, C, H]. The ``[C, C, H]`` decays exist
    for ``group`` chunks at a time (``lax.map``, rematerialised in the backward
    pass), so memory stays ``O(T C)`` per head, not ``O(T C H)``.
    """
    nc = k.shape[2]
    m = min(group, nc)
    q, k, b = (chunked.to_chunks(x, ax, m) for x, ax in ((q, 3), (k, 2), (b, 2)))

    @jax.checkpoint
    def scores(xs):
        qg, kg, bg = xs  # [B, K, G, m, C, H], [B, K, m, C, H] x 2
        return jnp.einsum("bkgnih,bknijh->bkgnij", qg, kg[..., None, :, :] * causal_decays(bg))

    a = jax.lax.map(scores, (jnp.moveaxis(q, 3, 0), jnp.moveaxis(k, 2, 0), jnp.moveaxis(b, 2, 0)))
    return chunked.from_chunks(jnp.moveaxis(a, 0, 3), 3, nc)


def decay_chunks(x: base.Inputs, chunk: int) -> jax.Array:
    """The chunkwise form: prepared :class:`~gated_base.Inputs` -> ``[B, K, G, T, Hv]``."""
    t = x.k.shape[2]
    q = chunked.to_chunks(x.q, 3, chunk)  # [B, K, G, nc, C, H]
    k = chunked.to_chunks(x.k, 2, chunk)  # [B, K, nc, C, H]
    v = chunked.to_chunks(x.v, 2, chunk)  # [B, K, nc, C, Hv]
    b = jnp.cumsum(chunked.to_chunks(x.g, 2, chunk), axis=-2)  # [B, K, nc, C, 1 or H]
    if b.shape[-1] == 1:
        a = jnp.einsum("bkgnih,bknjh->bkgnij", q, k) * causal_decays(b)[:, :, None, ..., 0]
    else:
        a = _channel_scores(q, k, b)  # [B, K, G, nc, C, C]
    last = b[..., -1:, :]  # [B, K, nc, 1, 1 or H]
    u = jnp.einsum("bknch,bkncd->bknhd", k * jnp.exp(last - b), v)  # chunk's own keys
    keep = jnp.exp(last[..., 0, :])[..., None]  # [B, K, nc, 1 or H, 1]

    def body(s, xs):  # s: [B, K, H, Hv], the state entering the chunk
        keep_n, u_n = xs
        return keep_n * s + u_n, s

    s0 = jnp.zeros((*k.shape[:2], k.shape[-1], v.shape[-1]), k.dtype)
    _, states = chunked.scan_chunks(body, s0, (keep, u), 2, 2)  # [B, K, nc, H, Hv]
    inter = jnp.einsum("bkgnih,bknhd->bkgnid", q * jnp.exp(b)[:, :, None], states)
    out = inter + jnp.einsum("bkgnij,bknjd->bkgnid", a, v)
    return chunked.from_chunks(out, 3, t)


def retnet(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    gamma: jax.Array | None = None,
    chunk: int = 64,
) -> jax.Array:
    """RetNet retention (Sun et al. 2023): a fixed decay per K/V head, chunkwise.

    q: [B, T, N, H], k: [B, T, K, H], v: [B, T, K, Hv] -> [B, T, N, Hv].
    ``gamma [K]``: decays in (0, 1), default ``1 - 2^(-5-h)``; ``chunk``: positions per chunk.
    """
    options = {"gamma": gamma, "chunk": chunk}
    return base.run(RETNET, decay_chunks, q, k, v, causal, kv_lengths, scale, options)


def mamba2(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    log_decay: jax.Array | None = None,
    chunk: int = 64,
) -> jax.Array:
    """Mamba-2 SSD (Dao & Gu 2024): a data-dependent scalar decay per token and K/V head.

    q (C in SSD): [B, T, N, H], k (B): [B, T, K, H], v (x): [B, T, K, Hv],
    log_decay (``dt * A``): [B, T, K], ``<= 0`` -> [B, T, N, Hv].
    """
    options = {"log_decay": log_decay, "chunk": chunk}
    return base.run(MAMBA2, decay_chunks, q, k, v, causal, kv_lengths, scale, options)


def gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    log_decay: jax.Array | None = None,
    chunk: int = 16,
) -> jax.Array:
    """Gated linear attention (Yang et al. 2024): a data-dependent decay per key channel.

    q: [B, T, N, H], k: [B, T, K, H], v: [B, T, K, Hv], log_decay: [B, T, K, H]
    ``<= 0`` (the layer's ``logsigmoid(x W1 W2) / 16``) -> [B, T, N, Hv].
    """
    options = {"log_decay": log_decay, "chunk": chunk}
    return base.run(GLA, decay_chunks, q, k, v, causal, kv_lengths, scale, options)


for _rule, _fn in ((RETNET, retnet), (MAMBA2, mamba2), (GLA, gla)):
    base.register(_rule, decay_chunks, _fn)
