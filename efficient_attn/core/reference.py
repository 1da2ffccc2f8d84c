"""Float64 NumPy ground truth for exact attention, independent of JAX."""

from __future__ import annotations

import numpy as np


def numpy_reference(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    kv_lengths: np.ndarray | None = None,
    scale: float | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 NumPy softmax attention: (output ``[B,Tq,N,Hv]``, weights ``[B,N,Tq,Tk]``).

    Independent of JAX; the ground truth that exact methods are tested against.
    ``mask`` (bool ``[Tq, Tk]``, e.g. a sparsity pattern) further restricts
    which pairs interact, on top of ``causal`` and ``kv_lengths``.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    n, h, kh = q.shape[2], q.shape[3], k.shape[2]
    scale = 1.0 / np.sqrt(h) if scale is None else float(scale)
    k_rep = np.repeat(k, n // kh, axis=2)
    logits = np.einsum("bqnh,bknh->bnqk", q, k_rep, optimize=True) * scale
    return softmax_attention_from_logits(logits, v, causal=causal, kv_lengths=kv_lengths, mask=mask)


def softmax_attention_from_logits(
    logits: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    kv_lengths: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 masked softmax of ``logits [B,N,Tq,Tk]`` applied to ``v [B,Tk,K,Hv]``.

    Returns (output ``[B,Tq,N,Hv]``, weights ``[B,N,Tq,Tk]``); rows that see no
    key are zero. Masks as in :func:`numpy_reference`. For references of
    methods with their own score function (e.g. ``additive``).
    """
    logits, v = np.asarray(logits, np.float64), np.asarray(v, np.float64)
    b, n, tq, tk = logits.shape
    v_rep = np.repeat(v, n // v.shape[2], axis=2)
    lengths = np.full(b, tk) if kv_lengths is None else np.asarray(kv_lengths)
    extra_mask = mask
    mask = np.arange(tk)[None, None, :] < lengths[:, None, None]
    if causal:
        mask = mask & (np.arange(tk)[None, :] <= np.arange(tq)[:, None] + tk - tq)[None]
    if extra_mask is not None:
        mask = mask & np.asarray(extra_mask, bool)[None]
    mask = np.broadcast_to(mask[:, None], logits.shape)
    logits = np.where(mask, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.exp(logits - row_max)
    denom = p.sum(-1, keepdims=True)
    w = p / np.where(denom == 0, 1.0, denom)
    return np.einsum("bnqk,bknd->bqnd", w, v_rep, optimize=True), w


def numpy_reference_grads(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    dout: np.ndarray,
    *,
    causal: bool = False,
    kv_lengths: np.ndarray | None = None,
    scale: float | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 (dq, dk, dv) of ``sum(attention(q, k, v) * dout)``, derived by hand.

    dV = W^T dO; dW = dO V^T; dS = W * (dW - rowsum(dW * W)); dQ = scale dS K;
    dK = scale dS^T Q. K/V gradients are summed over the query heads they serve.
    ``mask`` is as in :func:`numpy_reference`.
    """
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    b, _, n, h = q.shape
    tk, kh = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(h) if scale is None else float(scale)
    _, w = numpy_reference(q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale, mask=mask)
    g = n // kh
    k_rep, v_rep = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    dv_rep = np.einsum("bnqk,bqnd->bknd", w, dout, optimize=True)
    dw = np.einsum("bqnd,bknd->bnqk", dout, v_rep, optimize=True)
    ds = w * (dw - np.sum(dw * w, axis=-1, keepdims=True))
    dq = scale * np.einsum("bnqk,bknh->bqnh", ds, k_rep, optimize=True)
    dk_rep = scale * np.einsum("bnqk,bqnh->bknh", ds, q, optimize=True)

    def fold(x):  # [B, Tk, N, D] -> [B, Tk, K, D], summing each group
        return x.reshape(b, tk, kh, g, -1).sum(axis=3)

    return dq, fold(dk_rep), fold(dv_rep)
