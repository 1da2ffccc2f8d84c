"""Linear attention: ``phi(Q) (phi(K)^T V)``, O(N) time and memory, causal by chunks.

Katharopoulos et al. 2020, "Transformers are RNNs" (``elu + 1`` features);
ReLU features; Shen et al. 2018, "Efficient Attention" (softmax over features
for queries, over the sequence for keys); Choromanski et al. 2020,
"Rethinking Attention with Performers" (FAVOR+ positive orthogonal random
features). Causal attention is computed chunkwise as in GLA (Yang et al.
2023) and flash-linear-attention: a quadratic part inside each chunk of
``chunk`` positions plus the running state ``S = sum_j phi(k_j) v_j^T [F, Hv]``
and normaliser ``z = sum_j phi(k_j) [F]`` carried across chunks by
``jax.lax.scan``. The chunk body is rematerialised, so the backward pass
stores one state per chunk, never one per position. The same chunk step with
one position is the recurrent (RNN) form used for decoding
(:func:`efficient_attn.linear_step`).

Definitions. ``scale`` enters as ``sqrt(scale)`` on both sides:
``x = sqrt(scale) q``, ``y = sqrt(scale) k`` (the split under which FAVOR+
estimates ``exp(scale q·k)``; pass ``scale=1.0`` for the papers' unscaled
elu/relu/softmax maps). Key ``j`` is *visible* to query ``i`` when
``j < kv_lengths[b]`` and, if causal, ``j <= i + Tk - Tq``. Then

* ``linear_elu``, ``linear_relu``, ``performer`` (row-normalised):
  ``w_ij = phi(x_i)·phi(y_j) / max(sum_{visible j'} phi(x_i)·phi(y_j'), eps)``
  (``eps > 0`` for ``linear_relu`` only; elsewhere an all-zero row stays 0);
* ``linear_softmax`` (feature-normalised):
  ``w_ij = sum_f softmax(x_i)_f exp(y_jf) / sum_{visible j'} exp(y_j'f)``:
  the key softmax runs over the keys the query sees, so under ``causal=True``
  it is a running (prefix) softmax over the keys up to the query's position.

Rows that see no key are zero. Features, states and normalisers are float32
(float64 for float64 inputs). Exponential key features (``linear_softmax``,
``performer``) are shifted by the running maximum of the valid keys'
log-features (per head; per head and feature for ``linear_softmax``), and
performer queries per row (see :class:`FeatureMap`): constants that cancel in
the ratio, taken over valid keys only (padding never changes a result), that
keep logits of any magnitude finite in bf16. ``linear_softmax`` stays exact
while one chunk's key logits span less than float32's exp range (~87).

Cost of the causal form per position and head: ``O(chunk (F + Hv) + F Hv)``
time; memory ``O(N (H + Hv) + (N / chunk) F Hv)`` with gradients.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from efficient_attn.core import chunked, masking
from efficient_attn.core.registry import Recurrent, register_method
from efficient_attn.methods.feature_maps import FeatureMap, performer_projection  # noqa: F401
from efficient_attn.methods.feature_maps import feature_map as _feature_map

FAMILY = ("linear_elu", "linear_relu", "linear_softmax", "performer")


class LinearState(NamedTuple):
    """What the keys seen so far leave behind, per batch element and K/V head.

    ``s [B, K, F, Hv] = sum_j phi(k_j) v_j^T`` and ``z [B, K, F] = sum_j phi(k_j)``,
    both times ``exp(-m)``; ``m`` is the running maximum of the key
    log-features, ``[B, K, 1]`` (``performer``) or ``[B, K, F]``
    (``linear_softmax``); it stays 0 for elu/relu.
    """

    s: jax.Array
    z: jax.Array
    m: jax.Array


def _empty_state(fm: FeatureMap, b: int, kh: int, f: int, hv: int, dtype) -> LinearState:
    m_width = f if fm.per_feature else 1
    m = jnp.full((b, kh, m_width), -jnp.inf if fm.exp_keys else 0.0, dtype)
    return LinearState(jnp.zeros((b, kh, f, hv), dtype), jnp.zeros((b, kh, f), dtype), m)


def _safe_inverse(d: jax.Array, eps: float = 0.0) -> jax.Array:
    """``1 / max(d, eps)``; for ``eps == 0``, ``1/d`` with 0 where ``d`` is 0 (or subnormal)."""
    if eps > 0:
        return 1.0 / jnp.maximum(d, eps)
    ok = d >= jnp.finfo(d.dtype).tiny
    return jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0)


def _absorb(
    fm: FeatureMap, state: LinearState, y: jax.Array, valid: jax.Array
) -> tuple[jax.Array, LinearState]:
    """Key features ``beta [B, K, C, F]`` of ``y [B, K, C, H]`` and ``state`` rescaled to match.

    ``valid [B, 1, C]``: padded keys get zero features. Exponential features
    are ``exp(log-feature - m)`` with ``m`` the running maximum over valid keys.
    """
    feats = fm.key(y)
    mask = valid[..., None]
    if not fm.exp_keys:
        return jnp.where(mask, feats, 0.0), state
    logits = jnp.where(mask, feats, -jnp.inf)
    axes = -2 if fm.per_feature else (-2, -1)
    c = jax.lax.stop_gradient(jnp.max(logits, axis=axes))  # [B, K, F] or [B, K]
    m = jnp.maximum(state.m, c if fm.per_feature else c[..., None])
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    r = jnp.exp(state.m - m_safe)  # [B, K, 1 or F]
    beta = jnp.exp(logits - m_safe[:, :, None, :])
    return beta, LinearState(state.s * r[..., None], state.z * r, m)


def _readout(
    fm: FeatureMap,
    x: jax.Array,
    state: LinearState,
    beta: jax.Array | None = None,
    v: jax.Array | None = None,
) -> jax.Array:
    """Outputs ``[B, K, G, C, Hv]`` of queries ``x [B, K, G, C, H]``.

    Keys in ``state`` are visible to every query; with ``beta [B, K, C, F]``,
    ``v [B, K, C, Hv]`` (the chunk's own keys), query ``c`` also sees keys ``<= c``.
    """
    c = x.shape[-2]
    mass = state.z[:, :, None, :]  # visible key mass per feature: [B, K, 1, F]
    if beta is not None:
        mass = mass + jnp.cumsum(beta, axis=2)  # [B, K, C, F]
    alpha = fm.query(x, mass[:, :, None])  # [B, K, G, C, F]
    if fm.per_feature:
        alpha = alpha * _safe_inverse(mass)[:, :, None]
    num = jnp.einsum("bkgcf,bkfd->bkgcd", alpha, state.s)
    den = jnp.einsum("bkgcf,bkf->bkgc", alpha, state.z)
    if beta is not None:
        a = jnp.einsum("bkgif,bkjf->bkgij", alpha, beta)
        a = jnp.where(jnp.tril(jnp.ones((c, c), bool)), a, 0.0)
        num = num + jnp.einsum("bkgij,bkjd->bkgid", a, v)
        den = den + jnp.sum(a, axis=-1)
    if fm.per_feature:
        return num
    return num * _safe_inverse(den, fm.eps)[..., None]


def _accumulate(state: LinearState, beta: jax.Array, v: jax.Array) -> LinearState:
    """``state`` plus keys ``beta [B, K, C, F]`` with values ``v [B, K, C, Hv]``."""
    s = state.s + jnp.einsum("bkcf,bkcd->bkfd", beta, v)
    return LinearState(s, state.z + jnp.sum(beta, axis=2), state.m)


def _chunk_step(fm, state, x, y, v, valid):
    """One chunk: x [B,K,G,C,H], y [B,K,C,H], v [B,K,C,Hv], valid [B,1,C] -> (out, state)."""
    beta, state = _absorb(fm, state, y, valid)
    return _readout(fm, x, state, beta, v), _accumulate(state, beta, v)


def _add_keys(fm, state, y, v, valid):
    """``state`` after absorbing y [B,K,T,H], v [B,K,T,Hv] all at once (no outputs)."""
    beta, state = _absorb(fm, state, y, valid)
    return _accumulate(state, beta, v)


def _linear_attention(fm, q, k, v, *, causal, kv_lengths, scale, chunk):
    """q [B,Tq,N,H], k [B,Tk,K,H], v [B,Tk,K,Hv] -> [B,Tq,N,Hv] (chunked when causal)."""
    b, tq, n, h = q.shape
    tk, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    acc = masking.stat_dtype(q.dtype)
    root = jnp.sqrt(jnp.asarray(scale, acc))
    x = masking.group_queries(q.astype(acc) * root, kh).transpose(0, 2, 3, 1, 4)  # [B,K,G,Tq,H]
    y = (k.astype(acc) * root).transpose(0, 2, 1, 3)  # [B, K, Tk, H]
    vt = v.astype(acc).transpose(0, 2, 1, 3)  # [B, K, Tk, Hv]
    kv_len = masking.full_kv_lengths(kv_lengths, b, tk)
    valid = (jnp.arange(tk)[None, :] < kv_len[:, None])[:, None]  # [B, 1, Tk]
    state = _empty_state(fm, b, kh, fm.num_features(h), hv, acc)

    if not causal:
        state = _add_keys(fm, state, y, vt, valid)
        out = _readout(fm, x, state)  # [B, K, G, Tq, Hv]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, n, hv)

    offset = tk - tq  # query i sits at key position i + offset
    if offset > 0:
        state = _add_keys(fm, state, y[:, :, :offset], vt[:, :, :offset], valid[..., :offset])
        y, vt, valid = y[:, :, offset:], vt[:, :, offset:], valid[..., offset:]
    elif offset < 0:
        x = x[:, :, :, -offset:]
    length = min(tq, tk)
    c = min(chunk, length)

    def body(carry, xs):
        out, carry = _chunk_step(fm, carry, *xs)
        return carry, out

    xs = (
        chunked.to_chunks(x, 3, c),
        chunked.to_chunks(y, 2, c),
        chunked.to_chunks(vt, 2, c),
        chunked.to_chunks(valid, 2, c),
    )
    _, out = chunked.scan_chunks(body, state, xs, (3, 2, 2, 2), 3, checkpoint=True)
    out = chunked.from_chunks(out, 3, length)  # [B, K, G, length, Hv]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, length, n, hv)
    if offset < 0:
        out = jnp.pad(out, ((0, 0), (-offset, 0), (0, 0), (0, 0)))
    return out


def _quadratic_weights(fm, q, k, *, causal, kv_lengths, scale):
    """The ``[B, N, Tq, Tk]`` weights of the module docstring, computed directly in O(Tq*Tk)."""
    b, tq, n, _ = q.shape
    tk, kh = k.shape[1], k.shape[2]
    acc = masking.stat_dtype(q.dtype)
    root = jnp.sqrt(jnp.asarray(scale, acc))
    x = masking.group_queries(q.astype(acc) * root, kh)  # [B, Tq, K, G, H]
    feats = fm.key(k.astype(acc) * root)  # [B, Tk, K, F]
    mask = masking.dense_mask(kv_lengths, b, tq, tk, causal=causal)  # [B, Tq, Tk]
    valid = (jnp.arange(tk) < masking.full_kv_lengths(kv_lengths, b, tk)[:, None])[..., None, None]
    if fm.exp_keys:
        logits = jnp.where(valid, feats, -jnp.inf)
        c = jnp.max(logits, axis=1 if fm.per_feature else (1, 3), keepdims=True)
        beta = jnp.exp(logits - jnp.where(jnp.isfinite(c), c, 0.0))
    else:
        beta = jnp.where(valid, feats, 0.0)
    mass = jnp.einsum("bqs,bskf->bqkf", mask.astype(acc), beta)[:, :, :, None]  # [B,Tq,K,1,F]
    alpha = fm.query(x, mass)  # [B, Tq, K, G, F]
    if fm.per_feature:
        alpha = alpha * _safe_inverse(mass)
    w = jnp.einsum("bqkgf,bskf->bkgqs", alpha, beta) * mask[:, None, None]
    if not fm.per_feature:
        w = w * _safe_inverse(jnp.sum(w, axis=-1), fm.eps)[..., None]
    return w.reshape(b, n, tq, tk)


@functools.partial(jax.jit, static_argnames=("method", "causal", "eps"))
def _jitted_weights(q, k, kv_lengths, scale, projection, *, method, causal, eps):
    fm = FeatureMap(method, eps=eps, projection=projection)
    return _quadratic_weights(fm, q, k, causal=causal, kv_lengths=kv_lengths, scale=scale)


def _weights_of(method: str):
    def weights(q, k, *, causal, kv_lengths, scale, **options):
        fm, _ = _feature_map(method, q.shape[-1], options)
        return _jitted_weights(
            q, k, kv_lengths, scale, fm.projection, method=method, causal=causal, eps=fm.eps
        )

    weights.__name__ = f"{method}_weights"
    weights.__doc__ = f"``[B, N, Tq, Tk]`` weights of ``{method}`` (quadratic reference form)."
    return weights


@functools.partial(jax.jit, static_argnames=("method", "causal", "chunk", "eps"))
def _jitted(q, k, v, kv_lengths, scale, projection, *, method, causal, chunk, eps):
    fm = FeatureMap(method, eps=eps, projection=projection)
    out = _linear_attention(
        fm, q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale, chunk=chunk
    )
    return out.astype(q.dtype)


def _run(method, q, k, v, causal, kv_lengths, scale, **options):
    """Validate options, then one compiled program per (shapes, method, causal, chunk)."""
    fm, chunk = _feature_map(method, q.shape[-1], options)
    static = {"method": method, "causal": causal, "chunk": chunk, "eps": fm.eps}
    return _jitted(q, k, v, kv_lengths, scale, fm.projection, **static)


def _recurrent_form(method: str) -> Recurrent:
    """The recurrent form of ``method`` (state: :class:`LinearState`) for decoding."""

    def init_state(batch, kv_heads, head_dim, value_dim, *, dtype=jnp.float32, **options):
        fm = _feature_map(method, head_dim, options)[0]
        f = fm.num_features(head_dim)
        return _empty_state(fm, batch, kv_heads, f, value_dim, masking.stat_dtype(dtype))

    def step(state, q_t, k_t, v_t, *, scale, valid, **options):
        b, n, h = q_t.shape
        kh, hv = k_t.shape[1], v_t.shape[-1]
        fm = _feature_map(method, h, options)[0]
        if state.s.shape != (b, kh, fm.num_features(h), hv):
            raise ValueError(
                f"state.s has shape {state.s.shape}; these inputs need "
                f"{(b, kh, fm.num_features(h), hv)}"
            )
        acc = state.s.dtype
        root = jnp.sqrt(jnp.asarray(scale, acc))
        x = (q_t.astype(acc) * root).reshape(b, kh, n // kh, 1, h)
        y = (k_t.astype(acc) * root)[:, :, None]
        v = v_t.astype(acc)[:, :, None]
        out, state = _chunk_step(fm, state, x, y, v, valid[:, None, None])
        return out.reshape(b, n, hv).astype(q_t.dtype), state

    return Recurrent(init_state=init_state, step=step)


@register_method(
    "linear_elu",
    exact=False,
    family="linear",
    weights=_weights_of("linear_elu"),
    recurrent=_recurrent_form("linear_elu"),
)
def linear_elu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    chunk: int = 64,
) -> jax.Array:
    """Linear attention with ``phi = elu + 1`` (Katharopoulos et al. 2020); F = H features.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    ``chunk``: positions per chunk of the causal form (see the module docstring).
    """
    return _run("linear_elu", q, k, v, causal, kv_lengths, scale, chunk=chunk)


@register_method(
    "linear_relu",
    exact=False,
    family="linear",
    weights=_weights_of("linear_relu"),
    recurrent=_recurrent_form("linear_relu"),
)
def linear_relu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    chunk: int = 64,
    eps: float = 1e-6,
) -> jax.Array:
    """Linear attention with ``phi = relu``, normaliser floored at ``eps``; F = H features.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    Rows whose features all vanish return 0 (their weights sum to < 1).
    ``scale`` cancels (relu is positively homogeneous) except against ``eps``.
    """
    return _run("linear_relu", q, k, v, causal, kv_lengths, scale, chunk=chunk, eps=eps)


@register_method(
    "linear_softmax",
    exact=False,
    family="linear",
    weights=_weights_of("linear_softmax"),
    recurrent=_recurrent_form("linear_softmax"),
)
def linear_softmax(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    chunk: int = 64,
) -> jax.Array:
    """Efficient attention ``softmax_H(Q) (softmax_T(K)^T V)`` (Shen et al. 2018).

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    The key softmax over the sequence is taken over the keys each query sees:
    with ``causal=True`` it is a running softmax over the prefix ``j <= i + Tk - Tq``.
    """
    return _run("linear_softmax", q, k, v, causal, kv_lengths, scale, chunk=chunk)


@register_method(
    "performer",
    exact=False,
    family="linear",
    weights=_weights_of("performer"),
    recurrent=_recurrent_form("performer"),
)
def performer(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    chunk: int = 64,
    num_features: int = 256,
    seed: int = 0,
) -> jax.Array:
    """Performer FAVOR+ (Choromanski et al. 2020): positive orthogonal random features.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    ``phi(x) = exp(W x - |x|^2 / 2)`` with ``W = performer_projection(num_features,
    H, seed)`` shared by all heads, so ``phi(x)·phi(y)`` estimates
    ``exp(scale q·k)``; error shrinks like ``1/sqrt(num_features)``.
    """
    options = {"chunk": chunk, "num_features": num_features, "seed": seed}
    return _run("performer", q, k, v, causal, kv_lengths, scale, **options)
