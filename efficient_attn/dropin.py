"""A drop-in for ``jax.nn.dot_product_attention`` that runs any registered method.

``ea.dot_product_attention`` takes ``jax.nn.dot_product_attention``'s
arguments (bias, boolean mask, ``is_causal``, query and key lengths, local
windows, ``return_residual``) plus tokamax's ``logits_soft_cap``, splash
attention's segment ids, gpt-oss's attention sinks (Xiao et al. 2023,
"Efficient Streaming Language Models with Attention Sinks") and FlashAttention's
dropout, and translates them into what the methods share: masks become one
``mask_mod`` (so the tile engine skips the tiles they empty), the soft-cap a
``score_mod``, sinks a correction through the log-sum-exp. Wrappers of a
library's own attention (``xla``, ``cudnn``) get the arguments as they are
(:class:`efficient_attn.core.registry.Native`). Whatever the chosen method cannot
honour is a ``ValueError`` naming the argument and the methods that can.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core import api, mods
from efficient_attn.core.batching import Batch
from efficient_attn.core.merge import merge_attention
from efficient_attn.core.registry import get_method, methods

#: Drop-in argument -> the registry feature a method needs to honour it
#: (None: every method; ``is_causal`` with ``T != S`` needs ``"mask_mod"``, as
#: jax.nn's causal mask is top-left aligned and ``causal=`` is bottom-right).
ARGS: dict[str, str | None] = {
    "bias": "bias",
    "mask": "mask_mod",
    "is_causal": "causal",
    "query_seq_lengths": None,
    "key_value_seq_lengths": "kv_lengths",
    "local_window_size": "mask_mod",
    "return_residual": "lse",
    "logits_soft_cap": "score_mod",
    "segment_ids": "mask_mod",
    "sinks": "lse",
    "dropout": "dropout",
}


def honours(method: str, arg: str) -> bool:
    """Whether ``method`` honours drop-in argument ``arg`` (a key of :data:`ARGS`)."""
    spec = get_method(method)
    if spec.native is not None:
        return arg in spec.native.args
    feature = ARGS[arg]
    return feature is None or feature in spec.supports


def support_table() -> str:
    """Markdown table: which method honours which drop-in argument (from the registry)."""
    head = "| method | " + " | ".join(f"`{a}`" for a in ARGS) + " |"
    rows = [head, "|" + "---|" * (len(ARGS) + 1)]
    for name in methods():
        marks = ["yes" if honours(name, a) else "-" for a in ARGS]
        rows.append(f"| `{name}` | " + " | ".join(marks) + " |")
    return "\n".join(rows)


def _refuse(method: str, arg: str, feature: str | None = None) -> ValueError:
    feature = feature or ARGS[arg]
    able = [m for m in methods() if honours(m, arg) and get_method(m).available() is None]
    why = f" (it needs feature {feature!r})" if feature else ""
    return ValueError(
        f"method {method!r} cannot honour {arg}{why}; methods that can: {', '.join(able)}"
    )


def _window(local_window_size: Any) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    w = local_window_size
    if isinstance(w, int | np.integer) and not isinstance(w, bool):
        w = (int(w), int(w))
    ok = isinstance(w, tuple | list) and len(w) == 2
    ok = ok and all(isinstance(x, int | np.integer) and not isinstance(x, bool) for x in w)
    if not ok or min(w) < 0:
        raise ValueError(
            f"local_window_size must be an int >= 0 or a pair (left, right) of them; "
            f"got {local_window_size!r}"
        )
    return int(w[0]), int(w[1])


def _segments(q_ids: Any, kv_ids: Any, batch: Batch, t: int, s: int):
    if q_ids is None and kv_ids is None:
        return None
    if kv_ids is None and t == s:
        kv_ids = q_ids
    if q_ids is None or kv_ids is None:
        raise ValueError("cross attention (T != S) needs both q_segment_ids and kv_segment_ids")
    out = []
    for name, x, length in (("q_segment_ids", q_ids, t), ("kv_segment_ids", kv_ids, s)):
        arr = batch.per_example(name, x, (length,))
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array; got dtype {arr.dtype}")
        out.append(arr.astype(jnp.int32))
    return tuple(out)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    return_residual: bool = False,
    method: str = "blockwise",
    logits_soft_cap: float | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sinks: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    dropout_broadcast: bool = False,
    **options: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``jax.nn.dot_product_attention`` with ``method=`` any registered method.

    Args:
      query: ``[B, T, N, H]``, ``[T, N, H]``, or any number of leading batch dims
        ``[..., T, N, H]`` (as Flax and tokamax; flattened to one batch dim and back:
        then lengths are ``[...]``, segment ids ``[..., T]``, bias and mask
        broadcast to ``[..., N, T, S]``).
      key: ``[B, S, K, H]``, ``N % K == 0`` (grouped/multi-query for K < N).
      value: ``[B, S, K, Hv]``.
      bias: float, broadcastable to ``[B, N, T, S]``; added to ``scale * q.k``.
        Differentiable, whatever its broadcast shape.
      mask: bool, broadcastable to ``[B, N, T, S]``; True where the pair is visible.
      scale: default ``1/sqrt(H)`` (the method's own where it defines one).
      is_causal: top-left aligned as in jax.nn (query ``i`` sees keys ``j <= i``).
      query_seq_lengths: int ``[B]``; rows at or past it are zero.
      key_value_seq_lengths: int ``[B]``; keys at or past it are invisible.
      local_window_size: ``(left, right)``: query ``i`` sees keys
        ``i - left <= j <= i + right``; an int ``w`` means ``(w, w)``.
      return_residual: also return the log-sum-exp ``[B, T, N]`` (float32,
        differentiable; ``-inf`` for rows that see no key).
      method: a name from :func:`efficient_attn.methods` (default ``blockwise``).
      logits_soft_cap: ``cap * tanh(logits / cap)`` on ``scale * q.k + bias``,
        before masking (tokamax's definition; Gemma 2).
      q_segment_ids, kv_segment_ids: int ``[B, T]``/``[B, S]``: a query sees a
        key iff their ids are equal (packed sequences; kv defaults to q for T == S).
      sinks: float ``[N]``: a learned logit per head that joins every row's
        softmax denominator with no value (gpt-oss); differentiable.
      dropout_rate, dropout_rng: inverted dropout on the weights, reproducible
        per key and the same for every method (:class:`efficient_attn.core.masking.Dropout`).
      dropout_broadcast: one dropout mask for all batch rows and heads (Flax's
        ``broadcast_dropout``).
      **options: the method's options (``efficient-attn methods``).

    Returns:
      ``[..., T, N, Hv]`` in ``query.dtype`` (the inputs' leading dims), and
      the log-sum-exp ``[..., T, N]`` with ``return_residual``. Unlike jax.nn,
      which averages every value there, rows that see no key are zero (for
      the ``xla`` and ``cudnn`` methods the row is jax.nn's own).
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    batch = Batch.of(query, key, value)
    query, key, value = (batch.flatten(x) for x in (query, key, value))
    b, t, n = query.shape[:3]
    s = key.shape[1]
    if not batch.single:  # [..., T, N, H] or [T, N, H]: the arguments follow the inputs' dims
        bias = batch.broadcast("bias", bias, (n, t, s))
        mask = batch.broadcast("mask", mask, (n, t, s))
        query_seq_lengths = batch.per_example("query_seq_lengths", query_seq_lengths)
        key_value_seq_lengths = batch.per_example("key_value_seq_lengths", key_value_seq_lengths)
    for name, flag in (("is_causal", is_causal), ("return_residual", return_residual)):
        if not isinstance(flag, bool | np.bool_):
            raise ValueError(f"{name} must be a bool; got {flag!r}")
    window = _window(local_window_size)
    q_len = api.check_lengths("query_seq_lengths", query_seq_lengths, b, t, "T")
    kv_len = api.check_lengths("key_value_seq_lengths", key_value_seq_lengths, b, s, "S")
    segments = _segments(q_segment_ids, kv_segment_ids, batch, t, s)
    if logits_soft_cap is not None and (
        isinstance(logits_soft_cap, bool)
        or not isinstance(logits_soft_cap, int | float)
        or logits_soft_cap <= 0
    ):
        raise ValueError(f"logits_soft_cap must be a positive number; got {logits_soft_cap!r}")
    # Validated (and its seed drawn) once, by ea.attention; the native path refuses it.
    drop = (dropout_rate, dropout_rng, bool(dropout_broadcast)) if dropout_rate != 0 else None
    used = {
        "bias": bias is not None,
        "mask": mask is not None,
        "is_causal": bool(is_causal),
        "query_seq_lengths": q_len is not None,
        "key_value_seq_lengths": kv_len is not None,
        "local_window_size": window is not None,
        "return_residual": bool(return_residual),
        "logits_soft_cap": logits_soft_cap is not None,
        "segment_ids": segments is not None,
        "sinks": sinks is not None,
        "dropout": drop is not None,
    }
    spec = get_method(method)
    for arg, on in used.items():
        if on and not honours(method, arg):
            raise _refuse(method, arg)
    if spec.native is not None:
        out = _native(spec, query, key, value, bias, mask, scale, bool(is_causal), q_len, kv_len,
                      window, bool(return_residual), segments, options)  # fmt: skip
    else:
        out = _translated(spec.name, query, key, value, bias, mask, scale, bool(is_causal), kv_len,
                          window, logits_soft_cap, segments, sinks, drop,
                          bool(return_residual), q_len, options)  # fmt: skip
    return jax.tree.map(batch.unflatten, out)


def _native(spec, q, k, v, bias, mask, scale, is_causal, q_len, kv_len, window, residual,
            segments, options):  # fmt: skip
    """A library's own attention with its own arguments (segment ids become its mask)."""
    if options:
        raise ValueError(f"method {spec.name!r} takes no options; got {sorted(options)}")
    reason = spec.available()
    if reason is not None:
        raise ValueError(f"method {spec.name!r} is not available here: {reason}")
    b, t, n, _ = q.shape
    s = k.shape[1]
    if segments is not None:
        seg = (segments[0][:, :, None] == segments[1][:, None, :])[:, None]  # [B, 1, T, S]
        mask = seg if mask is None else mods.bool_mask(mask, b, n, t, s).mask & seg
    return spec.native.fn(
        q, k, v, bias, mask, scale=scale, is_causal=is_causal, query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len, local_window_size=window, return_residual=residual,
    )  # fmt: skip


def _translated(method, q, k, v, bias, mask, scale, is_causal, kv_len, window, cap, segments,
                sinks, drop, residual, q_len, options):  # fmt: skip
    """The arguments as mods, bias, dropout and an lse correction for a registered method."""
    b, t, n, _ = q.shape
    s = k.shape[1]
    spec = get_method(method)
    parts, causal = [], False
    if is_causal:
        if t == s:
            causal = True  # top-left == bottom-right for self-attention
        elif "mask_mod" in spec.supports:
            parts.append(mods.causal_mask(0))
        else:
            raise _refuse(method, "is_causal with T != S (top-left aligned)", "mask_mod")
    if mask is not None:
        parts.append(mods.bool_mask(mask, b, n, t, s))
    if window is not None:
        parts.append(mods.sliding_window(*window))
    if segments is not None:
        parts.append(mods.document_mask(*segments))
    mask_mod = None if not parts else parts[0] if len(parts) == 1 else mods.and_masks(*parts)
    extra = {}
    if mask_mod is not None:
        extra["mask_mod"] = mask_mod
    if cap is not None:
        extra["score_mod"] = mods.soft_cap(cap)
    if bias is not None:
        extra["bias"] = bias
    if drop is not None:
        extra.update(dropout_rate=drop[0], dropout_rng=drop[1], dropout_broadcast=drop[2])
    need_lse = residual or sinks is not None
    res = api.attention(
        q, k, v, method=method, causal=causal, kv_lengths=kv_len, scale=scale,
        return_lse=need_lse, **extra, **options,
    )  # fmt: skip
    out, lse = res if need_lse else (res, None)
    if sinks is not None:
        sinks = jnp.asarray(sinks)
        if sinks.shape != (n,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
            raise ValueError(
                f"sinks must be a float array [heads]=({n},); got {sinks.shape} {sinks.dtype}"
            )
        # The sink joins the denominator: a partial with no value and the sink as its lse.
        sink_lse = jnp.broadcast_to(sinks.astype(lse.dtype), lse.shape)
        out, lse = merge_attention((out, jnp.zeros_like(out)), (lse, sink_lse))
    if q_len is not None:
        rows = jnp.arange(t)[None, :] < q_len[:, None]  # [B, T]
        out = jnp.where(rows[:, :, None, None], out, jnp.zeros((), out.dtype))
        if lse is not None:
            lse = jnp.where(rows[:, :, None], lse, -jnp.inf)
    return (out, lse) if residual else out
