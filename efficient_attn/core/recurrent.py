"""Recurrent (decoding) form of the causal linear methods, dispatched through the registry.

A method that registers ``recurrent=`` (:class:`efficient_attn.core.registry.Recurrent`)
decodes one token at a time from a state of constant size: the feature-map
linear methods (``linear_elu``, ..., ``performer``) and the gated and
delta-rule recurrences (``retnet``, ``mamba2``, ``gla``, ``deltanet``,
``gated_deltanet``). Running :func:`step` over positions ``0..T-1`` equals
``ea.attention(..., causal=True)`` of the same method.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from efficient_attn.core.registry import Recurrent, get_method, methods, positive_int


def recurrent_methods() -> tuple[str, ...]:
    """Registered methods with a recurrent form, in registration order."""
    return tuple(m for m in methods() if get_method(m).recurrent is not None)


def _form(method: str) -> tuple[Recurrent, dict[str, Any], Any]:
    spec = get_method(method)
    if spec.recurrent is None:
        raise ValueError(
            f"{method=} has no recurrent form; methods with one: {', '.join(recurrent_methods())}"
        )
    return spec.recurrent, spec, spec.options


def init_state(
    method: str,
    batch: int,
    kv_heads: int,
    head_dim: int,
    value_dim: int,
    *,
    dtype: Any = jnp.float32,
    **options: Any,
) -> Any:
    """The empty recurrent state of ``method`` (no key seen yet) for inputs of ``dtype``.

    Statistics are float32 (float64 for float64 inputs). ``options`` are the
    method's options (e.g. ``num_features``, ``seed`` for performer); the state's
    shapes are in the method's docs (``LinearState``, ``RecurrentState``).
    """
    for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        positive_int(name, value)
    positive_int("value_dim", value_dim)
    form, spec, _ = _form(method)
    opts = spec.resolve_options(options)
    return form.init_state(batch, kv_heads, head_dim, value_dim, dtype=dtype, **opts)


def step(
    method: str,
    state: Any,
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    *,
    scale: float | None = None,
    valid: jax.Array | None = None,
    **options: Any,
) -> tuple[jax.Array, Any]:
    """One decoding step of the causal form: absorb ``(k_t, v_t)``, then attend with ``q_t``.

    q_t: [B, N, H], k_t: [B, K, H], v_t: [B, K, Hv] -> (out_t [B, N, Hv], new state).
    ``valid`` (bool ``[B]``, default all True): where False the token is padding,
    the state is left unchanged and ``out_t`` reads the state as is. ``scale``
    defaults to the method's (``1/sqrt(H)``). Per-token inputs are given for this
    token as keyword arguments: ``log_decay=[B, K]`` (``[B, K, H]`` for ``gla``),
    ``beta=[B, K]``; other ``options`` as for :func:`init_state`.
    """
    if q_t.ndim != 3 or k_t.ndim != 3 or v_t.ndim != 3:
        raise ValueError(
            f"q_t, k_t, v_t must be [B, N, H], [B, K, H], [B, K, Hv]; "
            f"got {q_t.shape}, {k_t.shape}, {v_t.shape}"
        )
    b, n, h = q_t.shape
    kh = k_t.shape[1]
    if k_t.shape != (b, kh, h) or v_t.shape[:2] != (b, kh) or n % kh:
        raise ValueError(f"bad step shapes q_t {q_t.shape}, k_t {k_t.shape}, v_t {v_t.shape}")
    form, spec, _ = _form(method)
    opts = spec.resolve_options(options)
    scale = spec.default_scale(h) if scale is None else scale
    valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
    if valid.shape != (b,):
        raise ValueError(f"valid must be a bool array of shape [B]=({b},); got {valid.shape}")
    return form.step(state, q_t, k_t, v_t, scale=scale, valid=valid, **opts)
