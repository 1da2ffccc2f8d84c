"""Merging partial attentions over disjoint key sets through their log-sum-exp.

Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; the
step that ring attention (Liu et al. 2023), split-KV decoding (FlashDecoding)
and attention sinks share: with ``out_i = softmax(s_i) V_i`` and ``lse_i =
logsumexp(s_i)`` over key set ``i``, attention over the union is
``sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i(lse_i)``. This is
the library's one merge: the ring, ``strided`` and the drop-in's ``sinks``
(a value-less partial whose lse is the sink logit) use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from efficient_attn.core import masking


def _check(outs: Sequence[jax.Array], lses: Sequence[jax.Array]):
    if not isinstance(outs, Sequence) or not isinstance(lses, Sequence):
        raise ValueError(
            "merge_attention takes a sequence of outs [..., T, N, Hv] and a sequence of lses "
            f"[..., T, N] (lists or tuples); got {type(outs).__name__}, {type(lses).__name__}"
        )
    if len(outs) != len(lses) or not outs:
        raise ValueError(
            f"merge_attention needs one lse per out, at least one of each; got {len(outs)} outs "
            f"and {len(lses)} lses"
        )
    outs, lses = [jnp.asarray(o) for o in outs], [jnp.asarray(x) for x in lses]
    shape = outs[0].shape
    if len(shape) < 1:
        raise ValueError("outs must be arrays [..., T, N, Hv]; got a scalar")
    for i, (o, x) in enumerate(zip(outs, lses, strict=True)):
        if o.shape != shape:
            raise ValueError(
                f"outs[{i}] has shape {o.shape} but outs[0] has {shape}: pass partial outputs "
                "of the same queries, all [..., T, N, Hv]"
            )
        if x.shape != shape[:-1]:
            raise ValueError(
                f"lses[{i}] has shape {x.shape}; it must be outs[{i}]'s shape without the value "
                f"dim, {shape[:-1]} (the [..., T, N] log-sum-exp of that partial)"
            )
        for name, a in ((f"outs[{i}]", o), (f"lses[{i}]", x)):
            if not jnp.issubdtype(a.dtype, jnp.floating):
                raise ValueError(f"{name} must be a floating-point array; got dtype {a.dtype}")
    return outs, lses


def _maximum(xs: list[jax.Array]) -> jax.Array:
    top = xs[0]
    for x in xs[1:]:
        top = jnp.maximum(top, x)
    return top


def merge_attention(
    outs: Sequence[jax.Array], lses: Sequence[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Attention over the union of disjoint key sets from each set's ``(out, lse)``.

    Args:
      outs: partial outputs ``[..., T, N, Hv]``, one per key set, of the same
        queries (e.g. ``ea.attention(..., return_lse=True)`` over each set).
      lses: their log-sum-exps ``[..., T, N]`` (float32; ``-inf`` where a row
        saw no key of that set: such a partial contributes nothing, whatever
        its ``out``).

    Returns:
      ``(out [..., T, N, Hv], lse [..., T, N])``: exact for disjoint key sets;
      ``out`` in the outs' promoted dtype (computed in float32, or float64 for
      float64 inputs), ``lse`` in float32 (float64). Rows that no set sees
      are zero with ``lse = -inf``. Differentiable in every ``out`` and
      ``lse`` (no NaN gradients for empty partials).
    """
    outs, lses = _check(outs, lses)
    out_dtype = jnp.result_type(*outs)
    acc = jnp.result_type(masking.stat_dtype(out_dtype), *lses)
    lses = [x.astype(acc) for x in lses]
    top = jax.lax.stop_gradient(_maximum(lses))  # [..., T, N]; the result is independent of it
    top = jnp.where(jnp.isfinite(top), top, jnp.zeros((), acc))
    weights = [jnp.exp(x - top) for x in lses]  # exp(-inf) = 0, with a zero derivative
    total = sum(weights[1:], weights[0])
    seen = total > 0
    safe = jnp.where(seen, total, jnp.ones((), acc))
    lse = jnp.where(seen, jnp.log(safe) + top, -jnp.inf)
    out = sum(
        (jnp.where((w > 0)[..., None], o.astype(acc), 0.0) * (w / safe)[..., None]
         for w, o in zip(weights, outs, strict=True)),
        jnp.zeros(outs[0].shape, acc),
    )  # fmt: skip
    return out.astype(out_dtype), lse
