"""Baselines: other libraries' attention registered as methods, for side-by-side sweeps.

``xla`` is JAX's unfused reference implementation; ``cudnn`` is cuDNN's fused
flash attention, ``pallas_mha`` JAX's own Pallas (Triton) flash attention op and
``tokamax`` tokamax's kernels (optional ``[gpu]`` extra), all GPU only. All exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from efficient_attn.core import masking
from efficient_attn.core.registry import Native, register_method


def _pad_heads(q, k, v):
    """Zero-pad the narrower of H and Hv: ops that need one head dim (zero features are inert)."""
    width = max(q.shape[-1], v.shape[-1])
    return [jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])]) for x in (q, k, v)]


def _jax_attention(q, k, v, *, causal, kv_lengths, scale, implementation):
    b, tq = q.shape[:2]
    tk = k.shape[1]
    kwargs = {}
    if causal and tq == tk:
        kwargs["is_causal"] = True
    elif causal:
        # Bottom-right alignment: key j visible iff j <= i + (Tk - Tq).
        kwargs["local_window_size"] = (tq + tk, tk - tq)
    hv = v.shape[-1]
    qp, kp, vp = _pad_heads(q, k, v)  # jax.nn.dot_product_attention needs Hv == H
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


@register_method("xla", exact=True, family="full", native=_native("xla"))
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


@register_method(
    "cudnn", exact=True, family="full", available=_cudnn_available, native=_native("cudnn")
)
def cudnn(q, k, v, *, causal: bool, kv_lengths: jax.Array | None, scale: float) -> jax.Array:
    """``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention (GPU).

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    fp16/bf16 only, head_dim <= 128 (cuDNN's limits; it raises otherwise).
    """
    return _jax_attention(
        q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale, implementation="cudnn"
    )


def _gpu_only(what: str):
    def available() -> str | None:
        platform = jax.default_backend()
        if platform != "gpu":
            return f"{what} runs on NVIDIA GPUs only; the default backend is {platform!r}"
        return None

    return available


@register_method(
    "pallas_mha",
    exact=True,
    family="full",
    supports=("causal", "grad"),
    available=_gpu_only("pallas_mha"),
)
def pallas_mha(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    block_q: int = 128,
    block_k: int = 64,
    interpret: bool = False,
) -> jax.Array:
    """JAX's Pallas GPU flash attention, ``jax.experimental.pallas.ops.gpu.attention.mha``.

    q, k: [B, T, N, H], v: [B, T, N, Hv] -> [B, T, N, Hv] (self-attention,
    N == K: the op has no GQA or key lengths). The op needs lengths that are
    block multiples (JAX issue #27224): this wrapper pads them and hides the
    padding with the op's segment ids. ``interpret`` runs it on a CPU.
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    del kv_lengths  # not a declared feature: the API passes None
    b, t = q.shape[:2]
    hv = v.shape[-1]
    qp, kp, vp = _pad_heads(q, k, v)
    block = max(block_q, block_k)
    tp = masking.cdiv(t, block) * block
    qp, kp, vp = (masking.pad_axis(x, 1, block) for x in (qp, kp, vp))
    segment_ids = None
    if tp != t:
        segment_ids = jnp.broadcast_to((jnp.arange(tp) >= t).astype(jnp.int32), (b, tp))
    bwd = max(16, min(block_q, block_k) // 2)  # the op's backward: equal blocks over q and k
    sizes = pallas_attention.BlockSizes(
        block_q=block_q, block_k=block_k, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd,
        block_kv_dq=bwd,
    )  # fmt: skip
    out = pallas_attention.mha(
        qp, kp, vp, segment_ids, sm_scale=float(scale), causal=causal, block_sizes=sizes,
        interpret=interpret,
    )  # fmt: skip
    return out[:, :t, :, :hv].astype(q.dtype)


def _tokamax_available() -> str | None:
    try:
        import tokamax  # noqa: F401
    except ImportError:
        return "tokamax is not installed (pip install 'efficient_attn[gpu]')"
    return _gpu_only("tokamax")()


@register_method(
    "tokamax", exact=True, family="full", supports=("causal", "kv_lengths", "gqa", "grad"),
    available=_tokamax_available,
)  # fmt: skip
def tokamax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    implementation: str = "triton",
) -> jax.Array:
    """tokamax's ``dot_product_attention`` (Pallas Triton or Mosaic GPU kernels), GPU only.

    q, k: [B, T, N|K, H], v: [B, T, K, Hv] -> [B, T, N, Hv] (self-attention;
    GQA). ``implementation``: tokamax's ``"triton"``, ``"mosaic"`` (Hopper and
    newer), ``"cudnn"`` or ``"xla"``. Needs the optional ``[gpu]`` extra.
    """
    import tokamax

    b, t = q.shape[:2]
    out = tokamax.dot_product_attention(
        q, k, v, scale=float(scale), is_causal=causal, key_value_seq_lengths=kv_lengths,
        implementation=implementation,
    )  # fmt: skip
    # Rows that see no key are zeros in our contract (as for the cuDNN baseline).
    rows = masking.nonempty_rows(kv_lengths, b, t, k.shape[1], causal=causal)
    return jnp.where(rows[:, :, None, None], out, 0).astype(q.dtype)
