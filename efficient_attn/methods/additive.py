"""Additive attention (Bahdanau, Cho & Bengio 2014), tiled: never materialises ``[Tq, Tk, A]``.

"Neural Machine Translation by Jointly Learning to Align and Translate":
the decoder scores every encoder state with a one-hidden-layer MLP,

    score(q_i, k_j) = w . tanh(q_i Wq + k_j Wk),    weights = softmax_j(scale * score),

with ``Wq = query_proj [H, A]``, ``Wk = key_proj [H, A]`` and
``w = score_vector [A]`` shared by all heads (array options: created by
``ea.init_arrays("additive", key, H)``, learned by
:class:`efficient_attn.nn.MultiHeadAttention`). ``scale`` defaults to 1.0.

Evaluated by the tiled online-softmax engine of :mod:`efficient_attn.core.engine`
with an additive :class:`~efficient_attn.core.engine.Score`: the projections are
computed once (``[B, T, N, A]``), and the ``tanh`` tensor only ever exists
for one ``block_q x block_k`` tile, forward and backward (the backward
recomputes it from the saved log-sum-exp), so memory is O(N) like
``blockwise``; time is O(Tq Tk A) (a tanh per pair and hidden unit).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core import engine, masking
from efficient_attn.core.reference import softmax_attention_from_logits
from efficient_attn.core.registry import MOD_FEATURES, ArrayOption, positive_int, register_method


@dataclasses.dataclass(frozen=True)
class AdditiveScore(engine.Score):
    """``w . tanh(q + k)`` on projected tiles ``q_i [B,K,G,bq,A]``, ``k_j [B,K,bk,A]``; w [A]."""

    def _hidden(self, q_i, k_j, acc):  # [B, K, G, bq, bk, A]
        return jnp.tanh(q_i.astype(acc)[..., :, None, :] + k_j.astype(acc)[:, :, None, None])

    def logits(self, params, q_i, k_j, acc):
        return jnp.einsum("bkgqsa,a->bkgqs", self._hidden(q_i, k_j, acc), params.astype(acc))

    def vjp(self, params, q_i, k_j, ds, acc):
        u = self._hidden(q_i, k_j, acc)
        g = ds[..., None] * (1.0 - u * u) * params.astype(acc)  # d/d(q_i + k_j)
        return g.sum(4), g.sum((2, 3)), jnp.einsum("bkgqsa,bkgqs->a", u, ds)


ADDITIVE = AdditiveScore()


def _score_vector_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """N(0, 1/A): scores of unit-variance tanh units start with O(1) spread."""
    return jax.random.normal(key, shape, dtype) / np.sqrt(shape[0]).astype(dtype)


ARRAYS = {
    "query_proj": ArrayOption(("H", "A"), jax.nn.initializers.lecun_normal(), "Wq [H, A]"),
    "key_proj": ArrayOption(("H", "A"), jax.nn.initializers.lecun_normal(), "Wk [H, A]"),
    "score_vector": ArrayOption(("A",), _score_vector_init, "w [A]"),
}


def _project(q, k, query_proj, key_proj):
    """Projected queries ``[B, Tq, N, A]`` and keys ``[B, Tk, K, A]`` (float32 or wider)."""
    acc = masking.stat_dtype(q.dtype)
    qp = jnp.einsum("bqnh,ha->bqna", q, query_proj.astype(q.dtype), preferred_element_type=acc)
    kp = jnp.einsum("bsnh,ha->bsna", k, key_proj.astype(k.dtype), preferred_element_type=acc)
    return qp, kp


def additive_weights(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    query_proj: jax.Array,
    key_proj: jax.Array,
    score_vector: jax.Array,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_q: int = 64,
    block_k: int = 64,
) -> jax.Array:
    """Explicit weights ``[B, N, Tq, Tk]``; scores computed one key tile at a time."""
    b, tq, n, _ = q.shape
    tk, kh = k.shape[1], k.shape[2]
    qp, kp = _project(q, k, query_proj, key_proj)
    acc = qp.dtype
    qg = jnp.moveaxis(masking.group_queries(qp, kh), 1, 3)  # [B, K, G, Tq, A]
    bk = min(positive_int("block_k", block_k), tk)
    kb = engine._kv_blocks(kp, bk)  # [nk, B, K, bk, A]
    s = jax.lax.map(lambda k_j: ADDITIVE.logits(score_vector, qg, k_j, acc), kb)
    s = jnp.moveaxis(s, 0, 4).reshape(*qg.shape[:4], -1)[..., :tk]  # [B, K, G, Tq, Tk]
    mask = masking.dense_mask(kv_lengths, b, tq, tk, causal=causal)[:, None, None]
    logits, mask = masking.apply_mods(s * scale, mask, mask_mod, score_mod)
    return masking.safe_softmax(logits, mask).reshape(b, n, tq, tk)


def additive_reference(
    q, k, v, *, causal=False, kv_lengths=None, scale=1.0, query_proj, key_proj, score_vector
) -> np.ndarray:
    """Float64 NumPy formula ``softmax_j(scale * w . tanh(q_i Wq + k_j Wk)) v_j``: [B,Tq,N,Hv]."""
    arrays = (q, k, query_proj, key_proj, score_vector)
    q, k, wq, wk, w = (np.asarray(x, np.float64) for x in arrays)
    n, kh = q.shape[2], k.shape[2]
    qp = q @ wq  # [B, Tq, N, A]
    kp = np.repeat(k @ wk, n // kh, axis=2)  # [B, Tk, N, A]
    rows = max(1, 2**22 // kp[0].size)  # query rows per chunk: bounded [B, rows, Tk, N, A]
    logits = np.concatenate(
        [
            np.einsum("bqkna,a->bnqk", np.tanh(qp[:, i : i + rows, None] + kp[:, None]), w)
            for i in range(0, q.shape[1], rows)
        ],
        axis=2,
    ) * float(scale)
    return softmax_attention_from_logits(logits, v, causal=causal, kv_lengths=kv_lengths)[0]


@register_method(
    "additive",
    exact=False,
    family="full",
    weights=additive_weights,
    arrays=ARRAYS,
    sizes={"A": 64},
    default_scale=lambda head_dim: 1.0,
    reference=additive_reference,
    supports=MOD_FEATURES,
)
def additive(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    query_proj: jax.Array | None = None,
    key_proj: jax.Array | None = None,
    score_vector: jax.Array | None = None,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_mask: Any = None,
    block_q: int = 64,
    block_k: int = 64,
) -> jax.Array:
    """Additive (MLP-score) attention of Bahdanau, Cho & Bengio 2014; O(N) memory, tiled.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv];
    query_proj, key_proj: [H, A]; score_vector: [A]. Tiles of ``block_q``
    queries and ``block_k`` keys bound the ``tanh`` tensor to
    ``B * N * block_q * block_k * A`` elements.
    """
    block_q, block_k = positive_int("block_q", block_q), positive_int("block_k", block_k)
    qp, kp = _project(q, k, query_proj, key_proj)
    return engine.attend(
        qp, kp, v, causal=causal, kv_lengths=kv_lengths, scale=jnp.asarray(scale, qp.dtype),
        block_q=block_q, block_k=block_k, mask_mod=mask_mod, score_mod=score_mod,
        block_mask=block_mask, score=ADDITIVE, params=score_vector.astype(qp.dtype),
    )[0]  # fmt: skip
