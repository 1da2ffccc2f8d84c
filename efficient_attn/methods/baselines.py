"""Baselines: ``jax.nn.dot_product_attention`` registered as methods, for side-by-side sweeps.

``xla`` is JAX's unfused reference implementation; ``cudnn`` is cuDNN's fused
flash attention (GPU only). Both are exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from efficient_attn import masking
from efficient_attn.registry import Native, register_method


def _jax_attention(q, k, v, *, causal, kv_lengths, scale, implementation):
    b, tq = q.shape[:2]
    tk = k.shape[1]
    kwargs = {}
    if causal and tq == tk:
        kwargs["is_causal"] = True
    elif causal:
        # Bottom-right alignment: key j visible iff j <= i + (Tk - Tq).
        kwargs["local_window_size"] = (tq + tk, tk - tq)
    # jax.nn.dot_product_attention needs Hv == H: zero-pad the narrower side
    # (zero features change neither the logits nor the kept output columns).
    h, hv = q.shape[-1], v.shape[-1]
    width = max(h, hv)
    qp, kp, vp = (jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])]) for x in (q, k, v))
    out = jax.nn.dot_product_attention(
        qp,
        kp,
        vp,
        scale=scale,
        key_value_seq_lengths=kv_lengths,
        implementation=implementation,
        **kwargs,
    )
    # jax.nn.dot_product_attention averages all values for a row that sees no
    # key; our contract is zeros. The row test is O(B*Tq).
    rows = masking.nonempty_rows(kv_lengths, b, tq, tk, causal=causal)
    return jnp.where(rows[:, :, None, None], out[..., :hv], 0).astype(q.dtype)


#: The drop-in arguments ``jax.nn.dot_product_attention`` honours itself (segment ids
#: become its boolean mask); soft-cap, sinks and dropout it has not.
_JAX_NN_ARGS = frozenset({
    "bias", "mask", "is_causal", "query_seq_lengths", "key_value_seq_lengths",
    "local_window_size", "return_residual", "segment_ids",
})  # fmt: skip


def _native(implementation: str) -> Native:
    fn = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
    return Native(fn, _JAX_NN_ARGS)


@register_method("xla", exact=True, native=_native("xla"))
def xla(q, k, v, *, causal: bool, kv_lengths: jax.Array | None, scale: float) -> jax.Array:
    """``jax.nn.dot_product_attention(implementation="xla")``: JAX's unfused baseline.

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    """
    return _jax_attention(
        q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale, implementation="xla"
    )


def _cudnn_available() -> str | None:
    platform = jax.default_backend()
    if platform != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU; the default backend is {platform!r}"
    return None


@register_method("cudnn", exact=True, available=_cudnn_available, native=_native("cudnn"))
def cudnn(q, k, v, *, causal: bool, kv_lengths: jax.Array | None, scale: float) -> jax.Array:
    """``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention (GPU).

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    fp16/bf16 only, head_dim <= 128 (cuDNN's limits; it raises otherwise).
    """
    return _jax_attention(
        q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale, implementation="cudnn"
    )
