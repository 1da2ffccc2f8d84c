"""Linear attention family: chunked == quadratic == recurrent, Performer, numerics, padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn import bench
from efficient_attn.methods import linear
from tests.conftest import make_qkv, rel_err

LINEAR = list(linear.FAMILY)


def _quadratic(method, q, k, v, **kw):
    """The simple O(Tq*Tk) form of the same kernel: explicit weights times repeated values."""
    w = ea.attention_weights(q, k, method=method, **kw)
    return jnp.einsum("bnqk,bknd->bqnd", w, jnp.repeat(v, q.shape[2] // k.shape[2], axis=2))


def _out_and_grads(f, q, k, v, dout):
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(dout))


# One shape shared by several tests, so their compiled programs are reused: causal cross
# attention (query i sees keys <= i + 14, so keys 0..13 form the initial state), 9 query
# positions in chunks of 4, and example 1 padded to 18 keys (rows 0..2 see fewer).
MAIN = {"tq": 9, "tk": 23, "chunk": 4, "kv_lengths": (23, 18)}


def _main_inputs(seed=0):
    q, k, v = make_qkv(2, MAIN["tq"], MAIN["tk"], 4, 2, 8, value_dim=6, seed=seed)
    dout = np.random.default_rng(seed + 1).standard_normal((2, MAIN["tq"], 4, 6))
    return q, k, v, dout.astype(np.float32)


def _main_kw(method):
    return {"method": method, "causal": True, "kv_lengths": np.array(MAIN["kv_lengths"])}


@pytest.mark.parametrize("method", LINEAR)
@pytest.mark.parametrize("case", ["main", "more-queries-than-keys"])
def test_chunked_causal_and_gradients_match_quadratic_form(method, case):
    if case == "main":
        q, k, v, dout = _main_inputs()
        kw, chunk = _main_kw(method), MAIN["chunk"]
    else:  # causal rows 0..12 see no key; example 1 has no key at all
        q, k, v = make_qkv(2, 20, 7, 4, 2, 8, value_dim=6, seed=1)
        dout = np.ones((2, 20, 4, 6), np.float32)
        kw, chunk = {"method": method, "causal": True, "kv_lengths": np.array([7, 0])}, 3
    fast = _out_and_grads(lambda q, k, v: ea.attention(q, k, v, chunk=chunk, **kw), q, k, v, dout)
    slow = _out_and_grads(lambda q, k, v: _quadratic(q=q, k=k, v=v, **kw), q, k, v, dout)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), fast, slow, strict=True):
        assert np.isfinite(np.asarray(x)).all(), name
        assert rel_err(x, ref) < 2e-5, (name, rel_err(x, ref))


@pytest.mark.parametrize("method", LINEAR)
def test_recurrent_steps_equal_causal_parallel_form(method):
    b, t, n, kh, h, hv = 2, 11, 4, 2, 8, 6
    q, k, v = make_qkv(b, t, t, n, kh, h, value_dim=hv, seed=5)
    lengths = np.array([t, 7])
    valid = np.arange(t)[:, None] < lengths[None, :]  # [T, B]: padding steps leave the state

    def scan_step(state, xs):
        q_t, k_t, v_t, valid_t = xs
        out, state = ea.linear_step(method, state, q_t, k_t, v_t, valid=valid_t)
        return state, out

    def decode(q, k, v):
        state = ea.linear_init_state(method, b, kh, h, hv)
        xs = (*(jnp.swapaxes(x, 0, 1) for x in (q, k, v)), jnp.asarray(valid))
        return jnp.swapaxes(jax.lax.scan(scan_step, state, xs)[1], 0, 1)

    got = np.asarray(jax.jit(decode)(q, k, v))
    ref = ea.attention(q, k, v, method=method, causal=True, kv_lengths=lengths, chunk=4)
    np.testing.assert_allclose(got, np.asarray(ref), rtol=2e-5, atol=2e-6)


def test_performer_error_shrinks_with_num_features():
    q, k, v = make_qkv(1, 32, 32, 2, 2, 16, seed=7)
    q, k = 0.5 * q, 0.5 * k  # logits of std 1/4: where the estimator's variance is moderate
    ref, _ = ea.numpy_reference(q, k, v)
    errors = []
    for m in (16, 64, 256):
        errs = [
            rel_err(ea.attention(q, k, v, method="performer", num_features=m, seed=s), ref)
            for s in range(4)
        ]
        errors.append(np.mean(errs))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0], errors  # Monte Carlo: ~1/sqrt(num_features)


def test_performer_seed_gives_same_features_and_seeds_differ():
    w0, w0b, w1 = (linear.performer_projection(40, 16, s) for s in (0, 0, 1))
    np.testing.assert_array_equal(w0, w0b)
    assert w0.shape == (40, 16) and not np.allclose(w0, w1)
    for block in (w0[:16], w0[16:32], w0[32:]):  # orthogonal rows within each block
        gram = block @ block.T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
    q, k, v = make_qkv(seed=2)

    def run(seed):
        return np.asarray(ea.attention(q, k, v, method="performer", seed=seed, num_features=32))

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.allclose(run(3), run(4))


@pytest.mark.parametrize(
    "method",
    [m if m in ("linear_elu", "performer") else pytest.param(m, marks=pytest.mark.slow)
     for m in LINEAR],
)  # fmt: skip
def test_large_logits_bf16_finite_forward_and_gradients(method):
    q, k, v, dout = _main_inputs(seed=11)
    q, k = 12.0 * q, 12.0 * k  # logits of magnitude ~30-500
    logits = np.einsum("bqnh,bknh->bnqk", q, np.repeat(k, 2, axis=2)) / np.sqrt(8)
    assert np.median(np.abs(logits)) > 30
    kw = _main_kw(method)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, dout)]
    got = _out_and_grads(lambda q, k, v: ea.attention(q, k, v, chunk=MAIN["chunk"], **kw), *bf16)
    f32 = [jnp.asarray(x, jnp.float32) for x in bf16]  # the same rounded inputs
    ref = _out_and_grads(lambda q, k, v: ea.attention(q, k, v, chunk=MAIN["chunk"], **kw), *f32)
    for name, x, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        x = np.asarray(x, np.float32)
        assert np.isfinite(x).all() and np.isfinite(np.asarray(r)).all(), name
        assert rel_err(x, r) < 2e-2, (name, rel_err(x, r))


@pytest.mark.parametrize("method", LINEAR)
def test_padding_is_ignored_and_gets_no_gradient(method):
    q, k, v, _ = _main_inputs(seed=3)
    n = MAIN["kv_lengths"][1]
    short = ea.attention(q[1:], k[1:, :n], v[1:, :n], method=method)
    full = ea.attention(q, k, v, method=method, kv_lengths=np.array(MAIN["kv_lengths"]))
    np.testing.assert_allclose(np.asarray(full)[1:], np.asarray(short), rtol=1e-5, atol=1e-6)
    kw = {**_main_kw(method), "chunk": MAIN["chunk"]}
    k2, v2 = k.copy(), v.copy()
    k2[1, n:], v2[1, n:] = 30.0, -1e4
    a, b = (np.asarray(ea.attention(q, kk, vv, **kw)) for kk, vv in ((k, v), (k2, v2)))
    np.testing.assert_array_equal(a, b)
    _, dk, dv = jax.grad(
        lambda q, k, v: jnp.sum(jnp.sin(ea.attention(q, k, v, **kw))), argnums=(0, 1, 2)
    )(q, k2, v2)
    np.testing.assert_array_equal(np.asarray(dk)[1, n:], 0.0)
    np.testing.assert_array_equal(np.asarray(dv)[1, n:], 0.0)
    assert np.abs(np.asarray(dk)[1, :n]).max() > 0


@pytest.mark.parametrize("method", LINEAR)
def test_weights_rows_sum_to_one_and_empty_rows_are_zero(method):
    q, k, _ = make_qkv(2, 12, 7, 4, 2, 16, seed=4)  # causal rows 0..4 see no key
    w = np.asarray(ea.attention_weights(q, k, method=method, causal=True, kv_lengths=[7, 0]))
    sums = w.sum(-1)  # [B, N, Tq]
    np.testing.assert_allclose(sums[0, :, 5:], 1.0, atol=1e-5)
    np.testing.assert_array_equal(w[0, :, :5], 0.0)
    np.testing.assert_array_equal(w[1], 0.0)
    assert (w >= 0).all()


def test_compiled_memory_is_linear_and_stores_no_per_position_state():
    """Compiled (not timed) fwd+bwd temporary memory of the causal chunked form."""

    def temp(t):
        args = bench.random_inputs(1, t, t, 2, 2, 64)
        f = bench.attention_fn("linear_elu", causal=True, backward=True, chunk=64)
        return bench.temp_bytes(bench.compiled(f, *args)[0])

    m1, m2 = temp(512), temp(1024)
    assert m2 / m1 < 2.2
    per_position_state = 1024 * 2 * 64 * 64 * 4  # one [H, Hv] float32 state per position
    assert m2 < per_position_state / 4


@pytest.mark.parametrize(
    "method,options,match",
    [
        ("linear_elu", {"chunk": 0}, "chunk=0 must be a positive int"),
        ("linear_softmax", {"chunk": 2.5}, "chunk=2.5 must be a positive int"),
        ("linear_relu", {"eps": 0.0}, "eps=0.0 must be a positive finite float"),
        ("linear_relu", {"eps": -1e-3}, "must be a positive finite float"),
        ("performer", {"num_features": 0}, "num_features=0 must be a positive int"),
        ("performer", {"num_features": True}, "must be a positive int"),
        ("performer", {"seed": -1}, "seed=-1 must be a non-negative int"),
        ("performer", {"seed": 1.5}, "must be a non-negative int"),
        ("performer", {"window": 3}, "unknown option"),
    ],
)
def test_option_validation(method, options, match):
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match=match):
        ea.attention(q, k, v, method=method, **options)
    if "window" not in options:
        with pytest.raises(ValueError, match=match):
            ea.attention_weights(q, k, method=method, **options)


def test_recurrent_api_errors():
    with pytest.raises(ValueError, match="has no recurrent form"):
        ea.linear_init_state("dense", 1, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown option"):
        ea.linear_init_state("linear_elu", 1, 1, 8, 8, num_features=4)
    with pytest.raises(ValueError, match="batch=0 must be a positive int"):
        ea.linear_init_state("linear_elu", 0, 1, 8, 8)
    state = ea.linear_init_state("performer", 2, 1, 8, 8, num_features=16)
    assert state.s.shape == (2, 1, 16, 8) and state.m.shape == (2, 1, 1)
    x = jnp.ones((2, 2, 8))
    with pytest.raises(ValueError, match=r"state\.s has shape"):
        ea.linear_step("performer", state, x, x[:, :1], x[:, :1])  # default num_features=256
    with pytest.raises(ValueError, match="must be"):
        ea.linear_step("performer", state, x[0], x[:, :1], x[:, :1], num_features=16)
