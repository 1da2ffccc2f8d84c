"""Gated and delta-rule recurrences: chunkwise == float64 recurrence, gradients, decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.methods import delta, gated
from efficient_attn.methods import gated_base as base
from efficient_attn.nn import MultiHeadAttention
from tests.conftest import make_qkv, method_arrays, rel_err

RULES = {r.name: r for r in (gated.RETNET, gated.MAMBA2, gated.GLA, delta.DELTANET)}
RULES["gated_deltanet"] = delta.GATED_DELTANET
METHODS = list(RULES)
#: By default the two most general rules run everywhere (gla: per-channel decay; gated_deltanet:
#: decay and delta rule, so both chunk kernels with per-token inputs); ``-m slow`` runs all.
DEFAULT = ("gla", "gated_deltanet")
F32_TOL = 2e-5  # relative error of float32 chunkwise forms vs the float64 recurrence
BF16_TOL = 3e-2  # bf16 inputs and outputs (float32 states) vs the float64 recurrence


def _params(default=DEFAULT):
    marks = {m: [] if m in default else [pytest.mark.slow] for m in METHODS}
    return [pytest.param(m, id=m, marks=marks[m]) for m in METHODS]


def _lengths_params():
    """Every (method, T, chunk); gla and gated_deltanet plus one length per other method by
    default (T=1000, 200, 63: the other methods share the kernels of those two)."""
    cases = [(1, 16), (63, 16), (200, 64), (1000, 32)]
    extra = {("retnet", 1000), ("mamba2", 200), ("deltanet", 63)}
    return [
        pytest.param(
            m,
            t,
            c,
            id=f"{m}-T{t}-C{c}",
            marks=[] if m in DEFAULT or (m, t) in extra else [pytest.mark.slow],
        )
        for m in METHODS
        for t, c in cases
    ]


def _inputs(method, t, seed=0, b=2, n=4, kh=2, h=8, hv=6):
    q, k, v = make_qkv(b, t, t, n, kh, h, value_dim=hv, seed=seed)
    arrays = method_arrays(method, h, seed=seed, B=b, T=t, K=kh)
    lengths = np.array([t, max(t * 2 // 3, 1)])
    return q, k, v, arrays, lengths


def _reference(method, q, k, v, arrays, lengths):
    spec = ea.get_method(method)
    return spec.reference(q, k, v, causal=True, kv_lengths=lengths, **arrays)


@pytest.mark.parametrize("method,t,chunk", _lengths_params())
def test_chunkwise_matches_float64_recurrence(method, t, chunk):
    """GQA (4 query heads on 2 K/V heads), example 1 padded, T not a multiple of chunk."""
    q, k, v, arrays, lengths = _inputs(method, t, seed=t)
    out = ea.attention(
        q, k, v, method=method, causal=True, kv_lengths=lengths, chunk=chunk, **arrays
    )
    assert rel_err(out, _reference(method, q, k, v, arrays, lengths)) < F32_TOL


def _gradients(method, q, k, v, arrays, lengths, chunk):
    """(float32 gradients of the chunkwise form, float64 ones of the per-token scan) of
    ``sum(out * dout)`` with respect to q, k, v and the per-token inputs, in that order."""
    b, t, n = q.shape[:3]
    dout = np.random.default_rng(2).standard_normal((b, t, n, v.shape[-1]))
    names = list(arrays)

    def loss(fn, dtype):
        def f(q, k, v, *xs):
            return jnp.sum(fn(q, k, v, dict(zip(names, xs, strict=True))) * dout.astype(dtype))

        return f

    def chunkwise(q, k, v, xs):
        return ea.attention(
            q, k, v, method=method, causal=True, kv_lengths=lengths, chunk=chunk, **xs
        )

    def recurrence(q, k, v, xs):
        return base.scan_reference(RULES[method], q, k, v, kv_lengths=lengths, **xs)

    args = (q, k, v, *(arrays[n] for n in names))
    argnums = tuple(range(len(args)))
    got = jax.grad(loss(chunkwise, np.float32), argnums)(*args)
    with jax.enable_x64(True):
        ref = jax.grad(loss(recurrence, np.float64), argnums)(
            *(np.asarray(x, np.float64) for x in args)
        )
        ref = [np.asarray(r) for r in ref]
    return dict(zip(["q", "k", "v", *names], zip(got, ref, strict=True), strict=True))


@pytest.mark.parametrize("method", _params())
def test_gradients_match_autodiff_of_float64_recurrence(method):
    """d(q, k, v, per-token inputs) of the chunkwise form vs autodiff of the per-token scan."""
    q, k, v, arrays, lengths = _inputs(method, 37, seed=1)
    for name, (g, r) in _gradients(method, q, k, v, arrays, lengths, chunk=8).items():
        assert np.isfinite(np.asarray(g)).all(), name
        assert rel_err(g, r) < 1e-4, (name, rel_err(g, r))


def test_gla_subchunks_exact_with_strong_decays():
    """gla's sub-chunked scores (16-position sub-chunks; a 40-position chunk padded to 48):
    output and gradients vs the recurrence, with log decays summing to about -120 per
    chunk, where a positive exponent (``exp(b_j - b_i)`` factored any other way) overflows."""
    q, k, v, _, lengths = _inputs("gla", 50, seed=3)
    rng = np.random.default_rng(4)
    strong = -rng.exponential(6.0, (2, 50, 2, 8)) * (rng.random((2, 50, 2, 8)) < 0.5)
    arrays = {"log_decay": strong.astype(np.float32)}
    out = ea.attention(q, k, v, method="gla", causal=True, kv_lengths=lengths, chunk=40, **arrays)
    assert rel_err(out, _reference("gla", q, k, v, arrays, lengths)) < F32_TOL
    for name, (g, r) in _gradients("gla", q, k, v, arrays, lengths, chunk=40).items():
        assert rel_err(g, r) < 1e-4, (name, rel_err(g, r))


@pytest.mark.parametrize("c", [1, 7, 16, 40, 64])
def test_unit_lower_inverse_matches_triangular_solve(c):
    """The blocked inverse (16 x 16 substitution blocks, merged; 40 padded to 64) and its
    custom VJP vs float64 ``solve_triangular`` and its autodiff, for 3 chunks at once."""
    rng = np.random.default_rng(c)
    lower = np.tril(rng.uniform(-1, 1, (3, c, c)), -1) * 0.5
    weights = rng.standard_normal((3, c, c))

    def solve(x):
        eye = jnp.broadcast_to(jnp.eye(c, dtype=x.dtype), x.shape)
        return jax.scipy.linalg.solve_triangular(eye + jnp.tril(x, -1), eye, lower=True)

    got = delta.unit_lower_inverse(jnp.asarray(lower, jnp.float32))
    got_grad = jax.grad(lambda x: jnp.sum(delta.unit_lower_inverse(x) * weights))(
        jnp.asarray(lower, jnp.float32)
    )
    with jax.enable_x64(True):
        ref = np.asarray(solve(jnp.asarray(lower)))
        ref_grad = np.asarray(jax.grad(lambda x: jnp.sum(solve(x) * weights))(jnp.asarray(lower)))
    assert rel_err(got, ref) < 1e-5
    assert rel_err(got_grad, ref_grad) < 1e-5


@pytest.mark.parametrize("method", _params())
def test_bf16_within_tolerance_of_float64(method):
    q, k, v, arrays, lengths = _inputs(method, 63, seed=3)
    q, k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k, v))
    cast = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out = ea.attention(*cast, method=method, causal=True, kv_lengths=lengths, chunk=16, **arrays)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, _reference(method, q, k, v, arrays, lengths)) < BF16_TOL


@pytest.mark.parametrize("method", _params())
def test_decoding_steps_equal_the_full_forward(method):
    b, t, n, kh, h, hv = 2, 11, 4, 2, 8, 6
    q, k, v, arrays, lengths = _inputs(method, t, seed=5, b=b, n=n, kh=kh, h=h, hv=hv)
    spec = ea.get_method(method)
    per_token = {n_: x for n_, x in arrays.items() if spec.arrays[n_].per_token}
    fixed = {n_: x for n_, x in arrays.items() if not spec.arrays[n_].per_token}
    valid = np.arange(t)[:, None] < lengths[None, :]  # [T, B]

    def decode(q, k, v, per_token):
        def body(state, xs):
            q_t, k_t, v_t, valid_t, tok = xs
            out, state = ea.linear_step(method, state, q_t, k_t, v_t, valid=valid_t, **tok, **fixed)
            return state, out

        state = ea.linear_init_state(method, b, kh, h, hv)
        xs = (*(jnp.swapaxes(x, 0, 1) for x in (q, k, v)), jnp.asarray(valid))
        tokens = {n_: jnp.swapaxes(x, 0, 1) for n_, x in per_token.items()}
        return jnp.swapaxes(jax.lax.scan(body, state, (*xs, tokens))[1], 0, 1)

    got = jax.jit(decode)(q, k, v, per_token)
    ref = ea.attention(q, k, v, method=method, causal=True, kv_lengths=lengths, chunk=4, **arrays)
    assert rel_err(got, ref) < F32_TOL


def test_retnet_default_decays_and_override():
    q, k, v = make_qkv(1, 20, 20, 4, 2, 8)
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(2))
    default = ea.attention(q, k, v, method="retnet", causal=True)
    np.testing.assert_allclose(
        default, ea.attention(q, k, v, method="retnet", causal=True, gamma=gamma), atol=1e-6
    )
    other = ea.attention(q, k, v, method="retnet", causal=True, gamma=np.array([0.5, 0.9]))
    ref = ea.get_method("retnet").reference(q, k, v, gamma=np.array([0.5, 0.9]))
    assert rel_err(other, ref) < F32_TOL and rel_err(other, default) > 1e-2


@pytest.mark.slow
def test_deltanet_without_l2norm_matches_its_recurrence():
    q, k, v, arrays, lengths = _inputs("deltanet", 30, seed=7)
    k = k * 0.3  # |beta k.k| < 2 keeps the unnormalised delta rule bounded
    kw = {"causal": True, "kv_lengths": lengths, "qk_l2norm": False}
    out = ea.attention(q, k, v, method="deltanet", chunk=8, **kw, **arrays)
    ref = ea.get_method("deltanet").reference(q, k, v, **kw, **arrays)
    assert rel_err(out, ref) < F32_TOL


def test_errors_name_what_is_valid():
    q, k, v, arrays, _ = _inputs("gated_deltanet", 13)
    with pytest.raises(ValueError, match="causal recurrence"):
        ea.attention(q, k, v, method="gated_deltanet", **arrays)
    with pytest.raises(ValueError, match=r"requires array option\(s\) \['log_decay', 'beta'\]"):
        ea.attention(q, k, v, method="gated_deltanet", causal=True)
    bad = {**arrays, "beta": arrays["beta"][:, :12]}
    with pytest.raises(ValueError, match="beta has T=12 but the key length has T=13"):
        ea.attention(q, k, v, method="gated_deltanet", causal=True, **bad)
    with pytest.raises(ValueError, match=r"must have shape \[B, T, K\]"):
        ea.attention(q, k, v, method="gated_deltanet", causal=True, **{**arrays, "beta": q})
    with pytest.raises(ValueError, match=r"log_decay must be <= 0"):
        bad = {**arrays, "log_decay": -arrays["log_decay"]}
        ea.attention(q, k, v, method="gated_deltanet", causal=True, **bad)
    with pytest.raises(ValueError, match=r"beta must be in \(0.0, 1.0\)"):
        ea.attention(
            q,
            k,
            v,
            method="gated_deltanet",
            causal=True,
            **{**arrays, "beta": 2 + 0 * arrays["beta"]},
        )
    with pytest.raises(ValueError, match="does not support"):  # cross attention
        ea.attention(q[:, :5], k, v, method="gated_deltanet", causal=True, **arrays)
    state = ea.linear_init_state("gated_deltanet", 2, 2, 8, 6)
    with pytest.raises(ValueError, match=r"needs beta= of shape \[2, 2\]"):
        ea.linear_step(
            "gated_deltanet", state, q[:, 0], k[:, 0], v[:, 0], log_decay=np.zeros((2, 2))
        )
    with pytest.raises(ValueError, match=r"needs log_decay= of shape \[2, 2, 8\]"):
        ea.linear_step("gla", state, q[:, 0], k[:, 0], v[:, 0], log_decay=np.zeros((2, 2)))
    assert set(METHODS) <= set(ea.recurrent_methods())


@pytest.mark.parametrize("method", _params(default=("deltanet",))[2:])
def test_layer_learns_per_token_inputs_from_its_input(method):
    layer = MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2, method=method, causal=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 13, 16))
    params = layer.init(jax.random.PRNGKey(1), x)
    assert {f"{n}_proj" for n in ea.get_method(method).arrays} <= set(params["params"])
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)["params"]
    for name in ea.get_method(method).arrays:
        assert np.abs(np.asarray(grads[f"{name}_proj"]["kernel"])).max() > 0, name
    x2 = x.at[:, 7:].add(3.0)  # the layer stays causal with data-dependent gates
    a, b = layer.apply(params, x), layer.apply(params, x2)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
