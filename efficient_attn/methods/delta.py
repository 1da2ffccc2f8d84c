"""Delta-rule linear attention, chunkwise: ``deltanet``, ``gated_deltanet``.

DeltaNet (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight
Programmers"; parallelised by Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length") and Gated DeltaNet
(Yang, Kautz & Hatamizadeh 2025): ``S_t = al_t (I - beta_t k_t k_t^T) S_{t-1}
+ beta_t k_t v_t^T`` (``al = 1`` for DeltaNet; definitions and options in
:mod:`efficient_attn.methods.gated_base`).

Chunkwise form with the UT transform (flash-linear-attention's
``chunk_gated_delta_rule``): inside a chunk of ``C`` positions with
cumulative log decay ``b`` and entering state ``S``, the written values
``n_i = beta_i (v_i - al_i S_{i-1}^T k_i)`` solve the unit lower-triangular system

    (I + L) N = diag(beta) V - diag(beta exp(b)) K S,
    L_ij = beta_i (k_i . k_j) exp(b_i - b_j)  (j < i),

so ``N = U - W S`` with ``U = (I + L)^-1 diag(beta) V`` and
``W = (I + L)^-1 diag(beta exp(b)) K`` (the WY representation; one triangular
inverse per chunk, blocked as FLA's ``solve_tril``: :func:`unit_lower_inverse`).
Then

    o_i = exp(b_i) S^T q'_i + sum_{j <= i} exp(b_i - b_j) (q'_i . k_j) n_j,
    S'  = exp(b_C) S + sum_j exp(b_C - b_j) k_j n_j^T.

The chunks run in order, one per step of a ``jax.lax.scan`` carrying ``S``
(the UT transform, the outputs and ``S'`` of one chunk per step), each step
rematerialised in the backward pass: it stores only the ``T / C`` entering
states, and the working set does not grow with ``T``.
Cost per head: ``O(T C (H + Hv) + T H Hv)`` plus a ``C x C`` inverse per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.core import chunked
from efficient_attn.methods import gated_base as base
from efficient_attn.methods.gated import causal_decays

DELTANET = base.Rule("deltanet", decay=None, delta=True)
GATED_DELTANET = base.Rule("gated_deltanet", decay="scalar", delta=True)


BLOCK = 16  # rows of the diagonal blocks inverted by substitution (FLA's solve_tril)


def _substitution(lower: jax.Array) -> jax.Array:
    """``(I + lower)^-1`` by forward substitution, one row at a time (``C`` steps)."""
    c = lower.shape[-1]

    def row(i, a):  # a: the strictly lower part of the inverse, rows < i final
        r = jax.lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False)  # [..., C]
        r = jnp.where(jnp.arange(c) < i, r + jnp.einsum("...j,...jc->...c", r, a), 0.0)
        return jax.lax.dynamic_update_index_in_dim(a, r, i, axis=-2)

    return jax.lax.fori_loop(1, c, row, -lower) + jnp.eye(c, dtype=lower.dtype)


def _blocks(x: jax.Array, m: int, pairs: list[tuple[int, int]]) -> jax.Array:
    """The ``m x m`` blocks ``(i, j)`` in ``pairs`` of ``x [..., P, P]``: ``[..., n, m, m]``."""
    return jnp.stack([x[..., i * m : (i + 1) * m, j * m : (j + 1) * m] for i, j in pairs], -3)


@jax.custom_vjp
def unit_lower_inverse(lower: jax.Array) -> jax.Array:
    """``(I + lower)^-1`` of strictly lower-triangular ``lower [..., C, C]``, blocked.

    flash-linear-attention's ``solve_tril``: the diagonal ``16 x 16`` blocks are
    inverted by forward substitution (16 steps, all blocks of all chunks at once),
    then pairs of neighbouring inverses merge level by level with the block inverse
    ``[[A, 0], [L, D]]^-1 = [[A^-1, 0], [-D^-1 L A^-1, D^-1]]`` (two matmuls;
    ``log2(C / 16)`` levels, ``C`` padded to ``16 * 2^p`` with identity rows). Plain
    XLA, no LAPACK call; the backward pass is ``dL = -X^T dX X^T`` (strictly lower).
    """
    c = lower.shape[-1]
    if c <= BLOCK:
        return _substitution(lower)
    nb = 1 << (-(-c // BLOCK) - 1).bit_length()  # diagonal blocks, a power of two
    p = nb * BLOCK
    lower = jnp.pad(lower, [(0, 0)] * (lower.ndim - 2) + [(0, p - c), (0, p - c)])
    x = _substitution(_blocks(lower, BLOCK, [(i, i) for i in range(nb)]))  # [..., nb, 16, 16]
    m = BLOCK
    while m < p:
        n = p // (2 * m)  # pairs merged at this level
        lower_21 = _blocks(lower, m, [(2 * i + 1, 2 * i) for i in range(n)])  # [..., n, m, m]
        x = x.reshape(*x.shape[:-3], n, 2, m, m)
        x_11, x_22 = x[..., 0, :, :], x[..., 1, :, :]
        top = jnp.concatenate([x_11, jnp.zeros_like(x_11)], axis=-1)
        bottom = jnp.concatenate([-(x_22 @ lower_21 @ x_11), x_22], axis=-1)
        x = jnp.concatenate([top, bottom], axis=-2)  # [..., n, 2m, 2m]
        m *= 2
    return x[..., 0, :c, :c]


def _inverse_fwd(lower):
    x = unit_lower_inverse(lower)
    return x, x


def _inverse_bwd(x, dx):
    xt = jnp.swapaxes(x, -1, -2)
    c = x.shape[-1]
    return (jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), -(xt @ dx @ xt), 0.0),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def delta_chunks(x: base.Inputs, chunk: int) -> jax.Array:
    """The chunkwise form: prepared :class:`~gated_base.Inputs` -> ``[B, K, G, T, Hv]``."""
    t, hv = x.k.shape[2], x.v.shape[-1]
    q = chunked.to_chunks(x.q, 3, chunk)  # [B, K, G, nc, C, H]
    k = chunked.to_chunks(x.k, 2, chunk)  # [B, K, nc, C, H]
    v = chunked.to_chunks(x.v, 2, chunk)  # [B, K, nc, C, Hv]
    beta = chunked.to_chunks(x.beta, 2, chunk)  # [B, K, nc, C]
    b = jnp.cumsum(chunked.to_chunks(x.g, 2, chunk)[..., 0], axis=-1)  # [B, K, nc, C]
    strict = jnp.tri(chunk, k=-1, dtype=bool)

    def body(s, xs):  # s: [B, K, H, Hv], the state entering the chunk
        q_n, k_n, v_n, beta_n, b_n = xs  # [B, K, G, C, H], [B, K, C, H | Hv], [B, K, C] x 2
        decays = causal_decays(b_n[..., None])[..., 0]  # [B, K, C, C], j <= i
        kk = jnp.einsum("bkih,bkjh->bkij", k_n, k_n)
        lower = jnp.where(strict, beta_n[..., :, None] * kk * decays, 0.0)
        rhs = jnp.concatenate(
            [beta_n[..., None] * v_n, (beta_n * jnp.exp(b_n))[..., None] * k_n], axis=-1
        )
        solved = unit_lower_inverse(lower) @ rhs  # the UT transform of [beta V, beta e^b K]
        u, w = solved[..., :hv], solved[..., hv:]  # [B, K, C, Hv], [B, K, C, H]
        new = u - jnp.einsum("bkch,bkhd->bkcd", w, s)  # written values n_i
        a = jnp.einsum("bkgih,bkjh->bkgij", q_n, k_n) * decays[:, :, None]
        out = jnp.einsum("bkgih,bkhd->bkgid", q_n * jnp.exp(b_n)[:, :, None, :, None], s)
        out = out + jnp.einsum("bkgij,bkjd->bkgid", a, new)
        last = b_n[..., -1:]  # [B, K, 1]
        kd = k_n * jnp.exp(last - b_n)[..., None]
        s = jnp.exp(last)[..., None] * s + jnp.einsum("bkch,bkcd->bkhd", kd, new)
        return s, out

    s0 = jnp.zeros((*k.shape[:2], k.shape[-1], hv), k.dtype)
    xs = (q, k, v, beta, b)
    out = chunked.scan_chunks(body, s0, xs, (3, 2, 2, 2, 2), 3, checkpoint=True)[1]
    return chunked.from_chunks(out, 3, t)


def deltanet(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    beta: jax.Array | None = None,
    chunk: int = 64,
    qk_l2norm: bool = True,
) -> jax.Array:
    """DeltaNet (Schlag et al. 2021; Yang et al. 2024): the delta rule, chunkwise (UT transform).

    q: [B, T, N, H], k: [B, T, K, H], v: [B, T, K, Hv], beta: [B, T, K] in (0, 1)
    -> [B, T, N, Hv]. ``qk_l2norm``: unit-norm queries and keys (FLA's default).
    """
    options = {"beta": beta, "chunk": chunk, "qk_l2norm": qk_l2norm}
    return base.run(DELTANET, delta_chunks, q, k, v, causal, kv_lengths, scale, options)


def gated_deltanet(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    log_decay: jax.Array | None = None,
    beta: jax.Array | None = None,
    chunk: int = 64,
    qk_l2norm: bool = True,
) -> jax.Array:
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025): a decayed delta rule, chunkwise.

    q: [B, T, N, H], k: [B, T, K, H], v: [B, T, K, Hv], log_decay: [B, T, K] ``<= 0``,
    beta: [B, T, K] in (0, 1) -> [B, T, N, Hv]. ``qk_l2norm`` as for ``deltanet``.
    """
    options = {"log_decay": log_decay, "beta": beta, "chunk": chunk, "qk_l2norm": qk_l2norm}
    return base.run(GATED_DELTANET, delta_chunks, q, k, v, causal, kv_lengths, scale, options)


for _rule, _fn in ((DELTANET, deltanet), (GATED_DELTANET, gated_deltanet)):
    base.register(_rule, delta_chunks, _fn)
