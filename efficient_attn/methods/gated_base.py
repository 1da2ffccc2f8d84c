"""What the decay-gated and delta-rule recurrences share: inputs, references, decoding, weights.

Per batch element and K/V head the state is ``S_t [H, Hv]`` and the output
``o_t = S_t^T q'_t`` with ``q' = scale * q`` (``scale`` default ``1/sqrt(H)``);
query head ``n`` reads the state of K/V head ``n // (N / K)``:

* ``retnet`` (Sun et al. 2023): ``S_t = gamma_h S_{t-1} + k_t v_t^T``,
  ``gamma_h = 1 - 2^(-5-h)`` for K/V head ``h`` (array option ``gamma [K]`` overrides);
* ``mamba2`` (SSD, Dao & Gu 2024): ``S_t = exp(a_t) S_{t-1} + k_t v_t^T``,
  ``a = log_decay [B, T, K]``;
* ``gla`` (Yang et al. 2024): ``S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T``, ``a [B, T, K, H]``;
* ``deltanet`` (Schlag et al. 2021; Yang et al. 2024):
  ``S_t = S_{t-1} + beta_t k'_t (v_t - S_{t-1}^T k'_t)^T``, ``beta [B, T, K]`` in (0, 1);
* ``gated_deltanet`` (Yang, Kautz & Hatamizadeh 2025):
  ``S_t = al_t S_{t-1} + beta_t k'_t (v_t - al_t S_{t-1}^T k'_t)^T``, ``al = exp(log_decay)``.

For the delta rules ``qk_l2norm=True`` uses ``q' = scale * q / |q|`` and
``k' = k / |k|`` (FLA's ``use_qk_l2norm_in_kernel``, ``|x| = sqrt(x.x + 1e-6)``).
Keys at positions ``>= kv_lengths[b]`` leave the state unchanged (their
decay is 1 and their key and value 0); the queries there read the state as is.
States and decays are float32 (float64 for float64 inputs) whatever the input dtype.

Here: the preparation of the inputs written once (:func:`prepare`), the
float64 NumPy recurrence (:func:`numpy_reference`) and the same recurrence
in ``jax.numpy`` (:func:`scan_reference`, differentiable: the tests' gradient
reference), the recurrent decoding form (:func:`recurrent_form`) and the
explicit weights (:func:`weights_of`). The chunkwise forms are in
:mod:`efficient_attn.methods.gated` and :mod:`efficient_attn.methods.delta`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.core import masking
from efficient_attn.core.registry import (
    ArrayOption,
    Recurrent,
    TokenProjection,
    positive_int,
    register_method,
)

_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Rule:
    """What distinguishes the five recurrences.

    ``decay``: None (no decay), ``"head"`` (fixed per K/V head: ``gamma [K]``),
    ``"scalar"`` (``log_decay [B, T, K]``) or ``"channel"`` (``log_decay [B, T, K, H]``);
    ``delta``: the delta rule (``beta [B, T, K]``) instead of adding ``k v^T``.
    """

    name: str
    decay: str | None
    delta: bool


class Inputs(NamedTuple):
    """Prepared float32 (float64) inputs of one call; padded keys already neutral.

    ``q [B, K, G, T, H]`` (scaled, normalised for the delta rules), ``k [B, K, T, H]``,
    ``v [B, K, T, Hv]``, ``g [B, K, T, 1 or H]`` log decays (0: no decay),
    ``beta [B, K, T]`` or None.
    """

    q: Any
    k: Any
    v: Any
    g: Any
    beta: Any


class RecurrentState(NamedTuple):
    """``s [B, K, H, Hv]``: the state ``S`` of every batch element and K/V head."""

    s: jax.Array


# ---- per-token inputs: how they are drawn, learned, checked -------------------------------


def retnet_gamma(key: Any, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """RetNet's decays ``1 - 2^(-5-h)`` for K/V heads ``h = 0..K-1`` (``key`` unused)."""
    return jnp.asarray(1.0 - 2.0 ** (-5.0 - np.arange(shape[0])), dtype)


def _draw_log_decay(key: Any, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Mamba-2-like per-token log decays ``-softplus(N(0,1) - 2)``: mean about -0.15."""
    return (-jax.nn.softplus(jax.random.normal(key, shape) - 2.0)).astype(dtype)


def _draw_gate(key: Any, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """GLA's per-channel gates ``logsigmoid(N(0,1)) / 16``."""
    return (jax.nn.log_sigmoid(jax.random.normal(key, shape)) / 16.0).astype(dtype)


def _draw_beta(key: Any, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Delta-rule writing strengths ``sigmoid(N(0,1))`` in (0, 1)."""
    return jax.nn.sigmoid(jax.random.normal(key, shape)).astype(dtype)


def _softplus_decay(z: jax.Array) -> jax.Array:  # Mamba-2: -A softplus(dt); decay ~0.95 at init
    return -jax.nn.softplus(z - 3.0)


def _gla_gate(z: jax.Array) -> jax.Array:
    return jax.nn.log_sigmoid(z) / 16.0


GAMMA = ArrayOption(
    ("K",), retnet_gamma, "decay per K/V head in (0, 1) (default RetNet's)", required=False
)
SCALAR_DECAY = ArrayOption(
    ("B", "T", "K"),
    _draw_log_decay,
    "log decay per token and K/V head (<= 0)",
    project=TokenProjection(_softplus_decay),
)
CHANNEL_DECAY = ArrayOption(
    ("B", "T", "K", "H"),
    _draw_gate,
    "log decay per token, K/V head and key channel (<= 0)",
    project=TokenProjection(_gla_gate, rank=16),
)
BETA = ArrayOption(
    ("B", "T", "K"),
    _draw_beta,
    "writing strength per token and K/V head in (0, 1)",
    project=TokenProjection(jax.nn.sigmoid),
)


def arrays_of(rule: Rule) -> dict[str, ArrayOption]:
    """The array options of ``rule``'s method."""
    arrays = {}
    if rule.decay == "head":
        arrays["gamma"] = GAMMA
    elif rule.decay == "scalar":
        arrays["log_decay"] = SCALAR_DECAY
    elif rule.decay == "channel":
        arrays["log_decay"] = CHANNEL_DECAY
    if rule.delta:
        arrays["beta"] = BETA
    return arrays


def _check_values(name: str, x: Any, low: float, high: float, closed_high: bool) -> None:
    """``ValueError`` when concrete ``x`` leaves ``[low, high]`` (``(low, high)`` for beta)."""
    if isinstance(x, jax.core.Tracer):
        return
    values = np.asarray(x, np.float64)
    bad = ~np.isfinite(values) | (values > high if closed_high else values >= high)
    bad |= values < low if closed_high else values <= low
    if bad.any():
        rule = f"<= {high}" if closed_high else f"in ({low}, {high})"
        raise ValueError(f"{name} must be {rule}; got values from {values.min()} to {values.max()}")


def check_options(rule: Rule, options: Mapping[str, Any]) -> tuple[int, bool]:
    """``(chunk, qk_l2norm)`` after validating the option values and the arrays' values."""
    chunk = positive_int("chunk", options["chunk"])
    l2norm = options.get("qk_l2norm", False)
    if not isinstance(l2norm, (bool, np.bool_)):
        raise ValueError(f"qk_l2norm={l2norm!r} must be a bool")
    if rule.decay == "head":
        _check_values("gamma", options["gamma"], 0.0, 1.0, False)
    elif rule.decay is not None:
        _check_values("log_decay", options["log_decay"], -np.inf, 0.0, True)
    if rule.delta:
        _check_values("beta", options["beta"], 0.0, 1.0, False)
    return chunk, bool(l2norm)


# ---- the shared preparation and the token-by-token recurrence -----------------------------


def prepare(xp: Any, rule: Rule, q, k, v, kv_lengths, scale, arrays, l2norm: bool) -> Inputs:
    """:class:`Inputs` of ``q [B, T, N, H]``, ``k [B, T, K, H]``, ``v [B, T, K, Hv]``.

    ``xp``: ``numpy`` (float64 reference) or ``jax.numpy`` (float32 or wider).
    ``arrays``: the rule's array options (see :func:`arrays_of`).
    """
    b, t = q.shape[:2]
    kh = k.shape[2]
    acc = np.float64 if xp is np else masking.stat_dtype(q.dtype)
    q, k, v = (xp.asarray(x, acc) for x in (q, k, v))
    if l2norm:
        q = q / xp.sqrt(xp.sum(q * q, axis=-1, keepdims=True) + _NORM_EPS)
        k = k / xp.sqrt(xp.sum(k * k, axis=-1, keepdims=True) + _NORM_EPS)
    q = q * xp.asarray(scale, acc)
    lengths = np.full((b,), t) if kv_lengths is None else kv_lengths
    valid = xp.arange(t)[None, :] < xp.asarray(lengths)[:, None]  # [B, T]
    k = xp.where(valid[..., None, None], k, 0.0).transpose(0, 2, 1, 3)  # [B, K, T, H]
    v = xp.where(valid[..., None, None], v, 0.0).transpose(0, 2, 1, 3)  # [B, K, T, Hv]
    q = masking.group_queries(q, kh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    if rule.decay == "head":
        gamma = xp.asarray(arrays["gamma"], acc)
        g = xp.broadcast_to(xp.log(gamma)[None, :, None, None], (b, kh, t, 1))
    elif rule.decay == "scalar":
        g = xp.asarray(arrays["log_decay"], acc).transpose(0, 2, 1)[..., None]  # [B, K, T, 1]
    elif rule.decay == "channel":
        g = xp.asarray(arrays["log_decay"], acc).transpose(0, 2, 1, 3)  # [B, K, T, H]
    else:
        g = xp.zeros((b, kh, t, 1), acc)
    g = xp.where(valid[:, None, :, None], g, 0.0)
    beta = None
    if rule.delta:
        beta = xp.where(valid[:, None], xp.asarray(arrays["beta"], acc).transpose(0, 2, 1), 0.0)
    return Inputs(q, k, v, g, beta)


def token_step(xp: Any, s, q_t, k_t, v_t, g_t, beta_t):
    """One position: ``s [B, K, H, Hv]``, ``q_t [B, K, G, H]``, ``k_t [B, K, H]``,
    ``v_t [B, K, Hv]``, ``g_t [B, K, 1 or H]``, ``beta_t [B, K]`` or None
    -> (new state, ``o_t [B, K, G, Hv]``)."""
    s = xp.exp(g_t)[..., None] * s
    if beta_t is not None:
        v_t = beta_t[..., None] * (v_t - xp.einsum("bkhd,bkh->bkd", s, k_t))
    s = s + k_t[..., :, None] * v_t[..., None, :]
    return s, xp.einsum("bkhd,bkgh->bkgd", s, q_t)


def _ungroup(out, b: int, t: int, n: int):
    """``[B, K, G, T, Hv] -> [B, T, N, Hv]``."""
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, out.shape[-1])


def _check_causal(name: str, causal: bool, q, k) -> None:
    if not causal or q.shape[1] != k.shape[1]:
        raise ValueError(f"{name} is a causal recurrence: it needs causal=True and Tq == Tk")


def numpy_reference(rule: Rule) -> Callable[..., np.ndarray]:
    """The float64 NumPy recurrence of ``rule``, one position at a time."""

    def reference(q, k, v, *, causal=True, kv_lengths=None, scale=None, qk_l2norm=None, **arrays):
        _check_causal(rule.name, causal, q, k)
        b, t, n, h = q.shape
        scale = 1.0 / np.sqrt(h) if scale is None else scale
        l2norm = rule.delta if qk_l2norm is None else qk_l2norm
        x = prepare(np, rule, q, k, v, kv_lengths, scale, arrays, l2norm)
        s = np.zeros((b, k.shape[2], h, v.shape[-1]))
        out = np.zeros((*x.q.shape[:-1], v.shape[-1]))  # [B, K, G, T, Hv]
        for i in range(t):
            beta_t = None if x.beta is None else x.beta[:, :, i]
            s, out[:, :, :, i] = token_step(
                np, s, x.q[:, :, :, i], x.k[:, :, i], x.v[:, :, i], x.g[:, :, i], beta_t
            )
        return _ungroup(out, b, t, n)

    reference.__name__ = f"{rule.name}_reference"
    reference.__doc__ = f"Float64 NumPy recurrence of ``{rule.name}``: [B, T, N, Hv]."
    return reference


def scan_reference(rule: Rule, q, k, v, *, kv_lengths=None, scale=None, l2norm=None, **arrays):
    """The recurrence in ``jax.numpy`` (a per-position ``lax.scan``), in the inputs' precision.

    Differentiable: under ``jax.experimental.enable_x64`` with float64 inputs it is
    the gradient reference of the chunkwise forms. Returns ``[B, T, N, Hv]``.
    """
    b, t, n, h = q.shape
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    l2norm = rule.delta if l2norm is None else l2norm
    x = prepare(jnp, rule, q, k, v, kv_lengths, scale, arrays, l2norm)
    s = jnp.zeros((b, k.shape[2], h, v.shape[-1]), x.q.dtype)
    beta = x.beta if x.beta is not None else jnp.zeros(x.k.shape[:3], x.q.dtype)

    def body(s, xs):
        q_t, k_t, v_t, g_t, beta_t = xs
        return token_step(jnp, s, q_t, k_t, v_t, g_t, beta_t if rule.delta else None)

    xs = (jnp.moveaxis(x.q, 3, 0), *(jnp.moveaxis(y, 2, 0) for y in (x.k, x.v, x.g, beta)))
    out = jnp.moveaxis(jax.lax.scan(body, s, xs)[1], 0, 3)
    return _ungroup(out, b, t, n)


# ---- running a chunkwise form; weights; decoding --------------------------------------------


Kernel = Callable[[Inputs, int], Any]  # (inputs, chunk) -> out [B, K, G, T, Hv]


@functools.partial(jax.jit, static_argnames=("rule", "kernel", "chunk", "l2norm"))
def _jitted(q, k, v, kv_lengths, scale, arrays, *, rule, kernel, chunk, l2norm):
    b, t, n, _ = q.shape
    x = prepare(jnp, rule, q, k, v, kv_lengths, scale, arrays, l2norm)
    return _ungroup(kernel(x, min(chunk, t)), b, t, n).astype(q.dtype)


def run(rule: Rule, kernel: Kernel, q, k, v, causal, kv_lengths, scale, options) -> jax.Array:
    """Validate, then the chunkwise form ``kernel`` compiled per (shapes, rule, chunk)."""
    _check_causal(rule.name, causal, q, k)
    chunk, l2norm = check_options(rule, options)
    arrays = {name: options[name] for name in arrays_of(rule)}
    static = {"rule": rule, "kernel": kernel, "chunk": chunk, "l2norm": l2norm}
    return _jitted(q, k, v, kv_lengths, scale, arrays, **static)


def weights_of(rule: Rule, kernel: Kernel) -> Callable[..., jax.Array]:
    """``weights(q, k, ...) -> [B, N, T, T]``: the chunkwise form applied to one-hot values.

    Every rule is linear in ``v`` (``o_i = sum_j W_ij v_j``), so values
    ``v_j = e_j`` give the matrix it applies: the decay-weighted causal
    ``(q'_i . k_j) prod decays`` for the gated rules, and for the delta rules the
    same through the UT transform ``(I + L)^-1 diag(beta)``.
    """

    def weights(q, k, *, causal, kv_lengths, scale, **options):
        b, t, kh = k.shape[:3]
        eye = jnp.broadcast_to(jnp.eye(t, dtype=jnp.float32)[None, :, None], (b, t, kh, t))
        out = run(rule, kernel, q, k, eye.astype(q.dtype), causal, kv_lengths, scale, options)
        return jnp.moveaxis(out.astype(jnp.float32), 1, 2)  # [B, N, T, T]

    weights.__name__ = f"{rule.name}_weights"
    weights.__doc__ = f"``[B, N, T, T]`` weights of ``{rule.name}`` (one-hot values)."
    return weights


def _token_arrays(rule: Rule, arrays: Mapping[str, Any], b: int, kh: int, h: int) -> dict:
    """One token's per-token arrays ``[B, K(, H)]`` checked and given a length-1 T axis."""
    out = {}
    for name, spec in arrays_of(rule).items():
        x = arrays.get(name)
        if not spec.per_token:
            out[name] = retnet_gamma(None, (kh,)) if x is None else x
            continue
        want = (b, kh, h) if spec.shape[-1] == "H" else (b, kh)
        if x is None or getattr(x, "shape", None) != want:
            got = None if x is None else getattr(x, "shape", type(x).__name__)
            raise ValueError(
                f"linear_step({rule.name!r}) needs {name}= of shape {list(want)} "
                f"([B, K{', H' if len(want) == 3 else ''}] for this token); got {got}"
            )
        out[name] = jnp.asarray(x)[:, None]
    return out


def recurrent_form(rule: Rule) -> Recurrent:
    """The decoding form of ``rule`` for :func:`efficient_attn.linear_step`."""

    def init_state(batch, kv_heads, head_dim, value_dim, *, dtype=jnp.float32, **options):
        shape = (batch, kv_heads, head_dim, value_dim)
        return RecurrentState(jnp.zeros(shape, masking.stat_dtype(dtype)))

    def step(state, q_t, k_t, v_t, *, scale, valid, **options):
        b, n, h = q_t.shape
        kh, hv = k_t.shape[1], v_t.shape[-1]
        if state.s.shape != (b, kh, h, hv):
            raise ValueError(
                f"state.s has shape {state.s.shape}; these inputs need {(b, kh, h, hv)}"
            )
        arrays = _token_arrays(rule, options, b, kh, h)
        _, l2norm = check_options(rule, {**options, **arrays})
        lengths = valid.astype(jnp.int32)  # the token is padding where not valid
        x = prepare(
            jnp, rule, q_t[:, None], k_t[:, None], v_t[:, None], lengths, scale, arrays, l2norm
        )
        beta = None if x.beta is None else x.beta[:, :, 0]
        s, out = token_step(
            jnp, state.s, x.q[:, :, :, 0], x.k[:, :, 0], x.v[:, :, 0], x.g[:, :, 0], beta
        )
        return out.reshape(b, n, hv).astype(q_t.dtype), RecurrentState(s)

    return Recurrent(init_state=init_state, step=step)


def register(rule: Rule, kernel: Kernel, fn: Callable[..., jax.Array]) -> None:
    """Register ``fn`` as the causal-only method of ``rule``, run by the chunkwise ``kernel``."""
    register_method(
        rule.name,
        exact=False,
        family="gated",
        supports=("causal", "kv_lengths", "gqa", "grad"),
        weights=weights_of(rule, kernel),
        arrays=arrays_of(rule),
        reference=numpy_reference(rule),
        causal_only=True,
        recurrent=recurrent_form(rule),
    )(fn)
