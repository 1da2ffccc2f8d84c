"""The conformance suite: every registered method, tested automatically.

A method registered with ``@ea.register_method`` is picked up here with no
edits. Features a method does not declare in ``supports`` must raise
``ValueError``; exact methods are compared with a float64 NumPy reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn import bench
from tests.conftest import make_qkv, method_arrays, method_params, rel_err

METHODS = method_params()
F32_TOL = 2e-5  # relative Frobenius error of exact methods in float32


def supports(method: str, *features: str) -> bool:
    return set(features) <= ea.get_method(method).supports


def require(method: str, *features: str) -> None:
    if not supports(method, *features):
        pytest.skip(f"{method} does not support {features}")


def arrays_for(method, q, k):
    """The array options of ``method`` (none for most; per-token ones sized for q, k)."""
    return method_arrays(method, q.shape[-1], **bench.input_dims(q, k))


def attend(method, q, k, v, **kw):
    """``ea.attention`` with the array options ``method`` requires (none for most; ``kw``
    may override them); causal recurrences (``causal_only``) default to ``causal=True``."""
    kw = {"causal": ea.get_method(method).causal_only, **arrays_for(method, q, k), **kw}
    return ea.attention(q, k, v, method=method, **kw)


def require_full(method: str) -> bool:
    """False (after checking the ValueError) for causal recurrences, which refuse causal=False."""
    if not ea.get_method(method).causal_only:
        return True
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="causal recurrence"):
        attend(method, q, k, v, causal=False)
    return False


def call(method, q, k, v, **kw):
    return np.asarray(attend(method, q, k, v, **kw), np.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_shape_and_dtype(method, dtype):
    q, k, v = make_qkv(heads=4, kv_heads=4, head_dim=16, value_dim=8)
    out = attend(method, q.astype(dtype), k.astype(dtype), v.astype(dtype))
    assert out.shape == (2, 13, 4, 8)
    assert out.dtype == dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize("method", METHODS)
def test_jit_matches_eager_and_is_deterministic(method):
    q, k, v = make_qkv(heads=4, kv_heads=4)
    f = jax.jit(lambda q, k, v: attend(method, q, k, v))
    a, b = np.asarray(f(q, k, v)), np.asarray(f(q, k, v))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, call(method, q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_finite(method):
    require(method, "grad")
    causal = supports(method, "causal")
    q, k, v = make_qkv(heads=4, kv_heads=4)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(attend(method, q, k, v, causal=causal)))

    for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v):
        assert np.isfinite(np.asarray(g)).all()
        assert np.abs(np.asarray(g)).max() > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kv_heads", [1, 2], ids=["mqa", "gqa"])
def test_gqa_equals_repeated_kv(method, kv_heads):
    q, k, v = make_qkv(heads=4, kv_heads=kv_heads)
    if not supports(method, "gqa"):
        with pytest.raises(ValueError, match="gqa"):
            attend(method, q, k, v)
        return
    rep = 4 // kv_heads
    spec = ea.get_method(method)
    arrays = arrays_for(method, q, k)  # arrays over K/V heads are repeated with them
    repeated = {
        n: np.repeat(x, rep, axis=spec.arrays[n].shape.index("K"))
        if "K" in spec.arrays[n].shape
        else x
        for n, x in arrays.items()
    }
    rk, rv = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    expected = call(method, q, rk, rv, **repeated)
    np.testing.assert_allclose(call(method, q, k, v, **arrays), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("q_len,kv_len", [(13, 13), (5, 13)], ids=["self", "cross"])
def test_causality(method, q_len, kv_len):
    q, k, v = make_qkv(q_len=q_len, kv_len=kv_len)
    if not supports(method, "causal"):
        with pytest.raises(ValueError, match="causal"):
            attend(method, q, k, v, causal=True)
        return
    require(method, "cross") if q_len != kv_len else None
    cut = kv_len - 3  # perturb keys/values at positions >= cut
    k2, v2 = k.copy(), v.copy()
    k2[:, cut:] += 5.0
    v2[:, cut:] -= 3.0
    a = call(method, q, k, v, causal=True)
    b = call(method, q, k2, v2, causal=True)
    unaffected = np.arange(q_len) + (kv_len - q_len) < cut  # rows that cannot see them
    assert unaffected.any() and not unaffected.all()
    np.testing.assert_allclose(a[:, unaffected], b[:, unaffected], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, ~unaffected], b[:, ~unaffected])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padding_ignored(method, causal):
    q, k, v = make_qkv()
    lengths = np.array([13, 6])
    if not supports(method, "kv_lengths"):
        with pytest.raises(ValueError, match="kv_lengths"):
            attend(method, q, k, v, kv_lengths=lengths)
        return
    if causal:
        require(method, "causal")
    elif not require_full(method):
        return
    k2, v2 = k.copy(), v.copy()
    k2[1, 6:] = 1e4  # huge values in padding must not leak
    v2[1, 6:] = -1e6
    a = call(method, q, k, v, causal=causal, kv_lengths=lengths)
    b = call(method, q, k2, v2, causal=causal, kv_lengths=lengths)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.isfinite(b).all()
    # Truncating the padded example to its length gives the same rows.
    short = call(method, q[1:], k[1:, :6], v[1:, :6], causal=False) if not causal else None
    if short is not None and supports(method, "cross"):
        np.testing.assert_allclose(a[1:], short, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_empty_rows_are_zero_not_nan(method):
    require(method, "kv_lengths")
    q, k, v = make_qkv()
    lengths = jnp.array([0, 7])
    out = call(method, q, k, v, kv_lengths=lengths)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], 0.0)
    assert np.abs(out[1]).max() > 0
    if supports(method, "grad"):

        def loss(q, k, v):
            return jnp.sum(attend(method, q, k, v, kv_lengths=lengths) ** 2)

        for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v):
            assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("method", METHODS)
def test_causal_cross_with_more_queries_than_keys_gives_zero_rows(method):
    require(method, "causal", "cross")
    q, k, v = make_qkv(q_len=9, kv_len=4)  # bottom-right: rows 0..4 see no key
    out = call(method, q, k, v, causal=True)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, :5], 0.0)
    assert np.abs(out[:, 5:]).min(axis=(0, 2, 3)).max() >= 0 and np.abs(out[:, 5:]).max() > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_weights_reproduce_attention(method, causal):
    if causal:
        require(method, "causal")
    elif not require_full(method):
        return
    q, k, v = make_qkv(q_len=11, kv_len=11, heads=4, kv_heads=2)
    kw = {"causal": causal}
    if supports(method, "kv_lengths"):
        kw["kv_lengths"] = np.array([11, 5])
    w = np.asarray(ea.attention_weights(q, k, method=method, **arrays_for(method, q, k), **kw))
    assert w.shape == (2, 4, 11, 11) and w.dtype == np.float32
    v_rep = np.repeat(v, 2, axis=2).astype(np.float64)
    expected = np.einsum("bnqk,bknd->bqnd", w.astype(np.float64), v_rep)
    np.testing.assert_allclose(call(method, q, k, v, **kw), expected, rtol=1e-4, atol=1e-5)


# ---- exact methods against the float64 reference ------------------------------

EXACT = [p for p in METHODS if ea.get_method(p.values[0]).exact]

SHAPES = [  # (B, Tq, Tk, N, K, H, causal, kv_lengths)
    pytest.param(2, 63, 63, 4, 4, 32, False, None, id="B2-T63-N4-H32"),
    pytest.param(1, 100, 100, 4, 2, 16, True, None, id="B1-T100-gqa-causal"),
    pytest.param(2, 37, 81, 6, 2, 24, True, (81, 30), id="B2-Tq37-Tk81-gqa3-causal-pad"),
    pytest.param(2, 50, 17, 2, 1, 8, True, (17, 9), id="B2-Tq50-Tk17-mqa-causal-pad"),
]


def _exact_inputs(b, tq, tk, n, kh, h, kv_lengths, seed=0):
    q, k, v = make_qkv(b, tq, tk, n, kh, h, seed=seed)
    lengths = None if kv_lengths is None else np.array(kv_lengths)
    dout = np.random.default_rng(seed + 1).standard_normal((b, tq, n, h)).astype(np.float32)
    return q, k, v, lengths, dout


def _out_and_grads(method, q, k, v, dout, dtype, **kw):
    cast = [jnp.asarray(x, dtype) for x in (q, k, v)]
    out, vjp = jax.vjp(lambda q, k, v: attend(method, q, k, v, **kw), *cast)
    return (out, *vjp(jnp.asarray(dout, dtype)))


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize(
    "b,tq,tk,n,kh,h,causal,kv_lengths",
    # The two square shapes are covered by the harder ones beside them: -m slow runs them.
    [pytest.param(*p.values, marks=pytest.mark.slow, id=p.id) for p in SHAPES[:2]] + SHAPES[2:],
)
def test_exact_float32_matches_float64_reference(method, b, tq, tk, n, kh, h, causal, kv_lengths):
    q, k, v, lengths, dout = _exact_inputs(b, tq, tk, n, kh, h, kv_lengths)
    kw = {"causal": causal, "kv_lengths": lengths}
    ref_out, _ = ea.numpy_reference(q, k, v, **kw)
    refs = (ref_out, *ea.numpy_reference_grads(q, k, v, dout, **kw))
    got = _out_and_grads(method, q, k, v, dout, jnp.float32, **kw)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, refs, strict=True):
        assert rel_err(x, ref) < F32_TOL, (name, rel_err(x, ref))


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("b,tq,tk,n,kh,h,causal,kv_lengths", SHAPES[2:3])
def test_exact_bf16_within_2x_of_dense_bf16(method, b, tq, tk, n, kh, h, causal, kv_lengths):
    """FlashAttention's convention: error vs float64 at most 2x dense-in-bf16's."""
    q, k, v, lengths, dout = _exact_inputs(b, tq, tk, n, kh, h, kv_lengths, seed=3)
    # Round inputs to bf16 first so both computations see identical data.
    q, k, v, dout = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k, v, dout))
    kw = {"causal": causal, "kv_lengths": lengths}
    ref_out, _ = ea.numpy_reference(q, k, v, **kw)
    refs = (ref_out, *ea.numpy_reference_grads(q, k, v, dout, **kw))
    got = _out_and_grads(method, q, k, v, dout, jnp.bfloat16, **kw)
    base = _out_and_grads("dense", q, k, v, dout, jnp.bfloat16, **kw)
    for name, x, y, ref in zip(("out", "dq", "dk", "dv"), got, base, refs, strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        assert rel_err(x, ref) <= 2 * rel_err(y, ref) + 1e-3, (name, rel_err(x, ref))


@pytest.mark.parametrize("method", EXACT)
def test_exact_large_logits_stable(method):
    q, k, v = make_qkv(q_len=24, kv_len=24)
    q = q * 30.0  # logits of magnitude ~100
    out = call(method, q, k, v, causal=supports(method, "causal"))
    ref, _ = ea.numpy_reference(q, k, v, causal=supports(method, "causal"))
    assert np.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4


# ---- methods defining their own function: against their float64 formula ---------

OWN = [p for p in METHODS if ea.get_method(p.values[0]).reference is not None]


@pytest.mark.parametrize("method", OWN)
@pytest.mark.parametrize("b,tq,tk,n,kh,h,causal,kv_lengths", SHAPES[2:3])
def test_own_reference_float64(method, b, tq, tk, n, kh, h, causal, kv_lengths):
    """Output vs the method's float64 NumPy formula; gradients (q, k, v and every array
    option) vs float64 central differences of that formula along random directions."""
    spec = ea.get_method(method)
    if tq != tk:  # causal recurrences test this in their own files (test_gated.py)
        require(method, "cross")
    q, k, v, lengths, dout = _exact_inputs(b, tq, tk, n, kh, h, kv_lengths)
    inputs = {"q": q, "k": k, "v": v, **arrays_for(method, q, k)}
    kw = {"causal": causal, "kv_lengths": lengths, "scale": spec.default_scale(h)}

    def reference_loss(x):
        out = spec.reference(x["q"], x["k"], x["v"], **kw, **{n: x[n] for n in spec.arrays})
        return float(np.sum(out * dout))

    out = call(method, q, k, v, **kw)
    ref = spec.reference(q, k, v, **kw, **{n: inputs[n] for n in spec.arrays})
    assert rel_err(out, ref) < F32_TOL

    def loss(x):
        arrays = {n: x[n] for n in spec.arrays}
        return jnp.sum(ea.attention(x["q"], x["k"], x["v"], method=method, **kw, **arrays) * dout)

    grads = jax.grad(loss)({n: jnp.asarray(x) for n, x in inputs.items()})
    rng, eps = np.random.default_rng(5), 1e-5
    for name, x in inputs.items():
        d = rng.standard_normal(x.shape)
        plus = reference_loss({**inputs, name: x.astype(np.float64) + eps * d})
        minus = reference_loss({**inputs, name: x.astype(np.float64) - eps * d})
        numeric = (plus - minus) / (2 * eps)
        g = np.asarray(grads[name], np.float64)
        assert abs(np.sum(g * d) - numeric) <= 1e-4 * (abs(numeric) + np.linalg.norm(g)), name


# ---- sparse methods: attention == dense softmax restricted to the pattern ----

PATTERNED = [p for p in METHODS if ea.get_method(p.values[0]).pattern is not None]


@pytest.mark.parametrize("method", PATTERNED)
@pytest.mark.parametrize(
    "tq,tk,causal,kv_lengths",
    [(77, 77, False, None), (77, 77, True, (77, 40)), (45, 130, True, (130, 3))],
    ids=["T77", "T77-causal-pad", "Tq45-Tk130-causal-pad"],
)
def test_pattern_matches_masked_dense(method, tq, tk, causal, kv_lengths):
    if causal:
        require(method, "causal")
    if tq != tk:
        require(method, "cross")
    pattern = ea.sparsity_pattern(method, tq, tk, causal=causal)
    assert pattern.shape == (tq, tk) and pattern.dtype == bool
    if causal:  # a causal pattern never reaches past the bottom-right diagonal
        assert not (pattern & ~np.tril(np.ones((tq, tk), bool), k=tk - tq)).any()
    q, k, v = make_qkv(2, tq, tk, 4, 2, 16)
    lengths = None if kv_lengths is None else np.array(kv_lengths)
    ref, ref_w = ea.numpy_reference(q, k, v, causal=causal, kv_lengths=lengths, mask=pattern)
    out = call(method, q, k, v, causal=causal, kv_lengths=lengths)
    assert rel_err(out, ref) < F32_TOL
    w = ea.attention_weights(q, k, method=method, causal=causal, kv_lengths=lengths)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=1e-5)


# ---- mods: a method that accepts mask_mod / score_mod applies them like dense does ----

MODDED = [p for p in METHODS if {"mask_mod", "score_mod"} & ea.get_method(p.values[0]).supports]


@pytest.mark.parametrize("method", MODDED)
def test_mods_equal_their_weights_and_refuse_nothing_silently(method):
    """Mods change the output; ``attention == attention_weights @ v`` under them; methods
    without the feature refuse the argument (tests/test_api covers the refusal text)."""
    from efficient_attn.core import mods

    q, k, v = make_qkv(2, 40, 40, 4, 2, 8, seed=11)
    seg = (np.arange(40)[None] * np.array([[3], [2]]) // 40).astype(np.int32)
    kw = {}
    if supports(method, "mask_mod"):
        kw["mask_mod"] = mods.document_mask(seg)
    if supports(method, "score_mod"):
        kw["score_mod"] = mods.alibi(mods.alibi_slopes(4))
    causal = supports(method, "causal")
    out = call(method, q, k, v, causal=causal, **kw)
    plain = call(method, q, k, v, causal=causal)
    assert np.isfinite(out).all() and rel_err(out, plain) > 1e-3
    w = ea.attention_weights(q, k, method=method, causal=causal, **method_arrays(method, 8), **kw)
    np.testing.assert_allclose(
        out, np.einsum("bnqk,bknd->bqnd", np.asarray(w), np.repeat(v, 2, axis=2)), atol=2e-5
    )
    if ea.get_method(method).exact:
        dense = call("dense", q, k, v, causal=causal, **kw)
        assert rel_err(out, dense) < F32_TOL


DROPIN_FEATURES = ("bias", "dropout", "lse")


@pytest.mark.parametrize("method", METHODS)
def test_bias_dropout_and_lse_equal_dense_or_are_refused(method):
    """Methods declaring ``bias``/``dropout``/``lse`` equal dense softmax under the same
    bias, the same counter-based dropout mask and their own pattern; the rest refuse them."""
    from efficient_attn.core import masking, mods

    q, k, v = make_qkv(2, 24, 24, 4, 2, 8, seed=12)
    causal = supports(method, "causal")
    spec = ea.get_method(method)
    refused = {
        "bias": {"bias": np.zeros((24, 24), np.float32)},
        "dropout": {"dropout_rate": 0.2, "dropout_rng": jax.random.PRNGKey(0)},
        "lse": {"return_lse": True},
    }
    if not set(DROPIN_FEATURES) & spec.supports:
        for kw in refused.values():
            with pytest.raises(ValueError, match="does not accept"):
                attend(method, q, k, v, causal=causal, **kw)
        return
    for feature, kw in refused.items():
        if feature not in spec.supports:
            with pytest.raises(ValueError, match="does not accept"):
                attend(method, q, k, v, causal=causal, **kw)
    pattern = None
    if spec.pattern is not None:
        pattern = mods.bool_mask(ea.sparsity_pattern(method, 24, 24, causal=causal), 2, 4, 24, 24)
    ref = functools.partial(ea.attention, method="dense", causal=causal, mask_mod=pattern)
    kw, ref_kw = {}, {}
    if "bias" in spec.supports:
        bias = np.random.default_rng(2).standard_normal((2, 1, 24, 24)).astype(np.float32)
        kw["bias"] = ref_kw["bias"] = bias
    if "dropout" in spec.supports:
        kw.update(dropout_rate=0.25, dropout_rng=jax.random.PRNGKey(3))
        ref_kw.update(kw)
    lse = "lse" in spec.supports
    out = attend(method, q, k, v, causal=causal, return_lse=lse, **kw)
    expected = ref(q, k, v, return_lse=lse, **ref_kw)
    out, expected = (out, expected) if lse else ((out,), (expected,))
    for a, b in zip(out, expected, strict=True):
        assert rel_err(a, b) < F32_TOL
    if "dropout" in spec.supports and "bias" not in spec.supports:
        # The mask is the documented hash of (b, h, q, kv), applied to the method's weights.
        w = ea.attention_weights(q, k, method=method, causal=causal)  # [B, N, Tq, Tk]
        idx = np.ix_(range(2), range(4), range(24), range(24))
        w = masking.dropout(0.25, jax.random.PRNGKey(3)).apply(w, *idx)
        np.testing.assert_allclose(
            out[0], np.einsum("bnqk,bknd->bqnd", w, np.repeat(v, 2, axis=2)), atol=2e-5
        )
