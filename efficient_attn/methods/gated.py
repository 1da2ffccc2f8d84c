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

Every exponent is ``<= 0`` (no overflow, whatever the decays). The chunks
run in order, one per step of a ``jax.lax.scan`` carrying ``S``, each step
rematerialised in the backward pass (:func:`decay_chunks`): the backward pass
stores only the ``T / C`` entering states, and every step works on one chunk,
so the working set does not grow with ``T``. ``gla`` (a decay per key
channel) follows FLA's ``chunk_gla`` (Yang et al. 2024, secondary chunking):
inside a chunk, sub-chunks of 16 positions; the blocks between sub-chunks are
plain matmuls and only the diagonal blocks need per-channel ``[16, 16, H]``
decays (:func:`_channel_scores`). Cost per head: ``O(T C (H + Hv) + T H Hv)``
time (``O(T 16 H)`` exponentials for ``gla``), ``O(T (H + Hv))`` memory.
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


SUB = 16  # positions per sub-chunk of gla's intra-chunk scores (FLA chunk_gla's ``BC``)


def _masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _diagonal_decays(b: jax.Array) -> jax.Array:
    """``exp(b_ih - b_jh)`` for ``j <= i``, else 0: ``b [..., c, H] -> [..., c, c, H]``."""
    tri = jnp.tri(b.shape[-2], dtype=bool)[..., None]
    return _masked_exp(b[..., :, None, :] - b[..., None, :, :], tri)


@jax.custom_vjp
def _diagonal_scores(q: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
    """``a_ij = sum_h q_ih k_jh exp(b_ih - b_jh)`` (``j <= i``) inside each sub-chunk.

    q: [B, K, G, s, c, H], k, b: [B, K, s, c, H] -> [B, K, G, s, c, c] (one chunk).
    The backward pass recomputes the decays ``e``: ``dq_i = sum_j da_ij k_j e_ij``,
    ``dk_j = sum_i da_ij q_i e_ij``, ``db = sum_G q dq - k dk``.
    """
    return jnp.einsum("bkgsih,bksijh->bkgsij", q, k[..., None, :, :] * _diagonal_decays(b))


def _diagonal_fwd(q, k, b):
    return _diagonal_scores(q, k, b), (q, k, b)


def _diagonal_bwd(res, da):
    q, k, b = res
    e = _diagonal_decays(b)  # [B, K, s, c, c, H]
    dq = jnp.einsum("bkgsij,bksijh->bkgsih", da, k[..., None, :, :] * e)
    dk = jnp.einsum("bkgsij,bkgsih,bksijh->bksjh", da, q, e)
    return dq, dk, jnp.sum(q * dq, axis=2) - k * dk


_diagonal_scores.defvjp(_diagonal_fwd, _diagonal_bwd)


def _channel_scores(q: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
    """``a_ij = sum_h q_ih k_jh exp(b_ih - b_jh)`` (``j <= i``) of one chunk: ``[B, K, G, C, C]``.

    q: [B, K, G, C, H], k, b: [B, K, C, H]. Sub-chunked as FLA's ``chunk_gla``
    (Yang et al. 2024, secondary chunking): the ``C`` positions split into
    sub-chunks of ``c = 16``; the block of sub-chunk ``i``'s queries and an earlier
    sub-chunk's keys is a plain matmul of ``q * exp(b - r_i)`` and ``k * exp(r_i - b)``
    with ``r_i`` the log decay at the sub-chunk's first position (both exponents
    ``<= 0``); only the diagonal blocks need per-channel decays (``[c, c, H]`` per
    sub-chunk, :func:`_diagonal_scores`), ``C / c`` times fewer than ``[C, C, H]``.
    """
    cc = k.shape[-2]
    c = min(SUB, cc)
    s = -(-cc // c)
    if s * c != cc:  # neutral positions at the chunk's end: zero q and k, b unchanged
        q, k = (jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, s * c - cc), (0, 0)]) for x in (q, k))
        b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, s * c - cc), (0, 0)], mode="edge")
    bk, kh, g = q.shape[:3]
    sub = (bk, kh, s, c, q.shape[-1])
    diag = _diagonal_scores(q.reshape(bk, kh, g, *sub[2:]), k.reshape(sub), b.reshape(sub))
    rows = []
    for i in range(s):
        blocks = [diag[..., i, :, :]]
        if i:
            rows_i = slice(i * c, (i + 1) * c)
            r = b[..., i * c : i * c + 1, :]  # [B, K, 1, H]
            qs = q[..., rows_i, :] * jnp.exp(b[..., rows_i, :] - r)[:, :, None]
            ks = k[..., : i * c, :] * jnp.exp(r - b[..., : i * c, :])
            blocks.insert(0, jnp.einsum("bkgih,bkjh->bkgij", qs, ks))
        if i < s - 1:
            blocks.append(jnp.zeros((bk, kh, g, c, (s - 1 - i) * c), q.dtype))
        rows.append(jnp.concatenate(blocks, axis=-1))
    return jnp.concatenate(rows, axis=-2)[..., :cc, :cc]


def _scores(q: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
    """One chunk's decayed causal scores ``[B, K, G, C, C]`` of q: [B, K, G, C, H],
    k: [B, K, C, H], b: [B, K, C, 1 or H] (cumulative log decays)."""
    if b.shape[-1] != 1:  # gla: a decay per key channel
        return _channel_scores(q, k, b)
    return jnp.einsum("bkgih,bkjh->bkgij", q, k) * causal_decays(b)[:, :, None, ..., 0]


def decay_chunks(x: base.Inputs, chunk: int) -> jax.Array:
    """The chunkwise form: prepared :class:`~gated_base.Inputs` -> ``[B, K, G, T, Hv]``.

    The chunks in order, one per step of a scan carrying the state; each step is
    rematerialised in the backward pass, which so stores only the ``T / C``
    entering states, and works on one chunk at a time (a working set that does
    not grow with ``T``; memory ``O(T (H + Hv))`` per head, as FLA's kernels).
    """
    t = x.k.shape[2]
    q = chunked.to_chunks(x.q, 3, chunk)  # [B, K, G, nc, C, H]
    k = chunked.to_chunks(x.k, 2, chunk)  # [B, K, nc, C, H]
    v = chunked.to_chunks(x.v, 2, chunk)  # [B, K, nc, C, Hv]
    b = jnp.cumsum(chunked.to_chunks(x.g, 2, chunk), axis=-2)  # [B, K, nc, C, 1 or H]

    def body(s, xs):  # s: [B, K, H, Hv], the state entering the chunk
        q_n, k_n, v_n, b_n = xs  # [B, K, G, C, H], [B, K, C, H], [B, K, C, Hv], [B, K, C, 1|H]
        last = b_n[..., -1:, :]  # [B, K, 1, 1 or H]
        out = jnp.einsum("bkgih,bkhd->bkgid", q_n * jnp.exp(b_n)[:, :, None], s)
        out = out + jnp.einsum("bkgij,bkjd->bkgid", _scores(q_n, k_n, b_n), v_n)
        u = jnp.einsum("bkch,bkcd->bkhd", k_n * jnp.exp(last - b_n), v_n)  # chunk's own keys
        return jnp.exp(last[..., 0, :])[..., None] * s + u, out

    s0 = jnp.zeros((*k.shape[:2], k.shape[-1], v.shape[-1]), k.dtype)
    out = chunked.scan_chunks(body, s0, (q, k, v, b), (3, 2, 2, 2), 3, checkpoint=True)[1]
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
    chunk: int = 64,
) -> jax.Array:
    """Gated linear attention (Yang et al. 2024): a data-dependent decay per key channel.

    q: [B, T, N, H], k: [B, T, K, H], v: [B, T, K, Hv], log_decay: [B, T, K, H]
    ``<= 0`` (the layer's ``logsigmoid(x W1 W2) / 16``) -> [B, T, N, Hv].
    """
    options = {"log_decay": log_decay, "chunk": chunk}
    return base.run(GLA, decay_chunks, q, k, v, causal, kv_lengths, scale, options)


for _rule, _fn in ((RETNET, retnet), (MAMBA2, mamba2), (GLA, gla)):
    base.register(_rule, decay_chunks, _fn)
