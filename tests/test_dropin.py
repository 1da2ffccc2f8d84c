"""The drop-in: ea.dot_product_attention against jax.nn and float64 references; Flax adapters."""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn import dropin
from efficient_attn.nn import attention_fn

#: Methods checked against jax.nn (dense materialises; blockwise runs the tile engine).
EXACT = {"dense": {}, "blockwise": {"block_q": 8, "block_k": 8}}


def _inputs(b=2, t=20, s=20, n=4, k=2, h=8, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)).astype(dtype)
    kk = rng.standard_normal((b, s, k, h)).astype(dtype)
    v = rng.standard_normal((b, s, k, h)).astype(dtype)
    return q, kk, v


def _visible(b, n, t, s, *, mask=None, is_causal=False, q_len=None, kv_len=None, window=None,
             segments=None):  # fmt: skip
    """Bool [B, N, T, S] of the pairs jax.nn lets interact (NumPy)."""
    qi, kj = np.arange(t)[:, None], np.arange(s)[None, :]
    vis = np.ones((b, n, t, s), bool)
    if mask is not None:
        vis &= np.broadcast_to(np.asarray(mask), vis.shape)
    if is_causal:
        vis &= kj <= qi
    if window is not None:
        vis &= (qi - window[0] <= kj) & (kj <= qi + window[1])
    if q_len is not None:
        vis &= (np.arange(t)[None, :] < np.asarray(q_len)[:, None])[:, None, :, None]
    if kv_len is not None:
        vis &= (np.arange(s)[None, :] < np.asarray(kv_len)[:, None])[:, None, None, :]
    if segments is not None:
        vis &= (segments[0][:, :, None] == segments[1][:, None, :])[:, None]
    return vis


def _rows(vis):
    """[B, T, N, 1]: rows that see a key (jax.nn averages the others; we give zeros)."""
    return np.transpose(vis.any(-1), (0, 2, 1))[..., None]


def _check_against_jax_nn(method, q, k, v, bias, rows, **kw):
    opts = EXACT[method]
    ref = jax.nn.dot_product_attention(q, k, v, bias, **kw)
    out = jax.jit(lambda *a: ea.dot_product_attention(*a, method=method, **kw, **opts))(
        q, k, v, bias
    )
    np.testing.assert_allclose(np.where(rows, out, 0), np.where(rows, ref, 0), atol=2e-5)
    np.testing.assert_array_equal(np.where(rows, 0, out), 0)  # empty rows: zeros
    cot = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32) * rows
    args = (q, k, v) if bias is None else (q, k, v, bias)

    def loss(fn, **extra):
        def f(*a):
            bb = a[3] if len(a) > 3 else None
            return jnp.sum(fn(a[0], a[1], a[2], bb, **kw, **extra) * cot)

        return f

    nums = tuple(range(len(args)))
    g_ref = jax.jit(jax.grad(loss(jax.nn.dot_product_attention), nums))(*args)
    g = jax.jit(jax.grad(loss(ea.dot_product_attention, method=method, **opts), nums))(*args)
    for name, a, r in zip(("dq", "dk", "dv", "dbias"), g, g_ref, strict=False):
        np.testing.assert_allclose(a, r, atol=5e-5, err_msg=name)


CASES = {
    "bias-BNTS": dict(bias=(2, 4, 20, 20)),
    "bias-1NTS": dict(bias=(1, 4, 20, 20)),
    "bias-B11S-causal": dict(bias=(2, 1, 1, 20), is_causal=True),
    "mask-broadcast": dict(mask=(2, 1, 20, 20)),
    "cross-causal-mask": dict(s=31, is_causal=True, mask=(1, 4, 1, 31)),
    "lengths": dict(q_len=[13, 20], kv_len=[20, 7]),
    "window": dict(window=(5, 2)),
    "everything-gqa-cross": dict(
        s=27,
        bias=(2, 4, 20, 27),
        mask=(2, 4, 20, 27),
        is_causal=True,
        q_len=[20, 16],
        kv_len=[25, 12],
        window=(9, 3),
    ),
}


#: Cases the others cover (the last one has every argument at once): run with -m slow.
_SLOW_CASES = {"bias-BNTS", "mask-broadcast"}


@pytest.mark.parametrize(
    ("method", "case"),
    [
        pytest.param("blockwise", c, marks=[pytest.mark.slow] if c in _SLOW_CASES else [])
        for c in CASES
    ]
    + [("dense", "bias-1NTS"), ("dense", "everything-gqa-cross")],
)
def test_values_and_gradients_equal_jax_nn(method, case):
    c = dict(CASES[case])
    s = c.pop("s", 20)
    q, k, v = _inputs(s=s)
    rng = np.random.default_rng(5)
    bias = c.pop("bias", None)
    bias = None if bias is None else rng.standard_normal(bias).astype(np.float32)
    kw = {}
    if "mask" in c:
        kw["mask"] = rng.random(c.pop("mask")) < 0.75
    if c.pop("is_causal", False):
        kw["is_causal"] = True
    if "q_len" in c:
        kw["query_seq_lengths"] = jnp.array(c.pop("q_len"))
    if "kv_len" in c:
        kw["key_value_seq_lengths"] = jnp.array(c.pop("kv_len"))
    if "window" in c:
        kw["local_window_size"] = c.pop("window")
    assert not c
    vis = _visible(2, 4, 20, s, mask=kw.get("mask"), is_causal=kw.get("is_causal", False),
                   q_len=kw.get("query_seq_lengths"), kv_len=kw.get("key_value_seq_lengths"),
                   window=kw.get("local_window_size"))  # fmt: skip
    _check_against_jax_nn(method, q, k, v, bias, _rows(vis), **kw)


def test_rank3_inputs_and_residuals_equal_jax_nn():
    q, k, v = (x[0] for x in _inputs(t=19, s=23))
    out, lse = ea.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    ref, ref_lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    assert out.shape == (19, 4, 8) and lse.shape == (19, 4)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5)
    # Our residual is differentiable (jax.nn stops its gradient): check it against dense.
    g = jax.jit(jax.grad(lambda q: jnp.sum(jnp.sin(ea.dot_product_attention(q, k, v,
                 return_residual=True)[1]))))(q)  # fmt: skip
    g_ref = jax.jit(jax.grad(lambda q: jnp.sum(jnp.sin(ea.dot_product_attention(q, k, v,
                     return_residual=True, method="dense")[1]))))(q)  # fmt: skip
    np.testing.assert_allclose(g, g_ref, atol=2e-5)


def test_window_int_is_symmetric_and_xla_passes_arguments_through():
    q, k, v = _inputs()
    a = ea.dot_product_attention(q, k, v, local_window_size=3, method="blockwise")
    b = ea.dot_product_attention(q, k, v, local_window_size=(3, 3), method="xla")
    np.testing.assert_allclose(a, b, atol=2e-5)


def _np_reference(q, k, v, *, scale, bias=None, cap=None, segments=None, sinks=None,
                  causal=False):  # fmt: skip
    """Float64 NumPy: softmax(cap(scale q.k + bias), masked; sinks in the denominator) v."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if cap is not None:
        s = cap * np.tanh(s / cap)
    vis = np.ones(s.shape, bool)
    if segments is not None:
        vis &= (segments[0][:, :, None] == segments[1][:, None, :])[:, None]
    if causal:
        vis &= np.tril(np.ones(s.shape[-2:], bool))
    s = np.where(vis, s, -np.inf)
    m = s.max(-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, np.asarray(sinks, np.float64)[None, :, None, None])
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True)
    if sinks is not None:
        den = den + np.exp(np.asarray(sinks, np.float64)[None, :, None, None] - m)
    return np.einsum("bnts,bsnh->btnh", e / den, v)


@pytest.mark.parametrize("method", ["dense", "blockwise", "local"])
def test_soft_cap_segment_ids_and_sinks_match_float64(method):
    q, k, v = _inputs(t=21, s=21)
    q = q * 3  # large logits, so the cap matters
    seg = np.array([[0] * 8 + [1] * 13, [0] * 5 + [1] * 5 + [2] * 11], np.int32)
    sinks = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    opts = {"blockwise": {"block_q": 8, "block_k": 8}, "local": {"window": 64}}.get(method, {})
    out = ea.dot_product_attention(
        q, k, v, is_causal=True, logits_soft_cap=5.0, q_segment_ids=seg, sinks=sinks,
        method=method, **opts,
    )  # fmt: skip
    ref = _np_reference(q, k, v, scale=8**-0.5, cap=5.0, segments=(seg, seg), sinks=sinks,
                        causal=True)  # fmt: skip
    np.testing.assert_allclose(out, ref, atol=3e-5)


def test_sinks_are_learnable_and_soft_cap_applies_to_the_bias_too():
    q, k, v = (x.astype(np.float64) for x in _inputs(t=9, s=9, n=2, k=2))
    bias = np.random.default_rng(3).standard_normal((1, 2, 9, 9)) * 4
    sinks = np.array([0.3, -0.2])
    with jax.enable_x64(True):
        out = ea.dot_product_attention(q, k, v, bias, logits_soft_cap=2.0, sinks=sinks,
                                       method="blockwise", block_q=4, block_k=4)  # fmt: skip
        np.testing.assert_allclose(
            out, _np_reference(q, k, v, scale=8**-0.5, bias=bias, cap=2.0, sinks=sinks), atol=1e-10
        )

        def loss(sinks):
            return jnp.sum(ea.dot_product_attention(q, k, v, sinks=sinks, method="blockwise") ** 2)

        g = jax.jit(jax.grad(loss))(jnp.asarray(sinks))
        loss = jax.jit(loss)
        eps = 1e-6
        for h in range(2):
            d = np.eye(2)[h] * eps
            fd = (loss(sinks + d) - loss(sinks - d)) / (2 * eps)
            np.testing.assert_allclose(g[h], fd, rtol=1e-6)


def test_empty_rows_with_sinks_are_zero_and_finite():
    q, k, v = _inputs(t=8, s=8)
    seg = np.array([[0] * 4 + [1] * 4] * 2)
    kvseg = np.array([[0] * 8] * 2)  # queries of segment 1 see no key
    f = lambda q: ea.dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=kvseg,  # noqa: E731
                                           sinks=jnp.zeros(4))  # fmt: skip
    out = jax.jit(f)(q)
    assert np.all(np.asarray(out)[:, 4:] == 0) and np.isfinite(out).all()
    assert np.isfinite(jax.jit(jax.grad(lambda q: jnp.sum(f(q) ** 2)))(q)).all()


def test_dropout_is_reproducible_method_independent_and_unbiased():
    q, k, v = _inputs(t=16, s=16)
    key = jax.random.PRNGKey(4)
    kw = dict(dropout_rate=0.4, is_causal=True)
    tiled = jax.jit(lambda r: ea.dot_product_attention(q, k, v, dropout_rng=r, block_q=8, block_k=8,
                                                       **kw))  # fmt: skip
    a, b = tiled(key), tiled(key)
    c = jax.jit(lambda r: ea.dot_product_attention(q, k, v, dropout_rng=r, method="dense", **kw))(
        key
    )  # counter-based: the same mask as the tiles'

    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=2e-5)
    other = tiled(jax.random.PRNGKey(5))
    assert np.abs(np.asarray(other) - np.asarray(a)).max() > 0.1
    # Unbiased: the mean over many keys approaches the output without dropout.
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    outs = jax.jit(jax.vmap(lambda r: ea.dot_product_attention(q, k, v, dropout_rate=0.4,
                    dropout_rng=r, is_causal=True, method="dense")))(keys)  # fmt: skip
    plain = ea.dot_product_attention(q, k, v, is_causal=True)
    err = np.abs(np.asarray(outs.mean(0)) - np.asarray(plain)).mean()
    spread = np.asarray(outs.std(0)).mean() / np.sqrt(400)
    assert err < 3 * spread, (err, spread)
    # The keep rate is 1 - rate.
    keep = ea.core.masking.dropout(0.4, key).keep(*ea.core.masking.mod_indices(2, 2, 2, 64, 64))
    assert abs(float(np.asarray(keep).mean()) - 0.6) < 0.01


def test_dropout_forward_and_backward_are_consistent():
    """Finite differences along a random direction, float64, one dropout key, both methods."""
    q, k, v = (x.astype(np.float64) for x in _inputs(t=12, s=12))
    bias = np.random.default_rng(2).standard_normal((2, 1, 12, 12))
    rng = np.random.default_rng(9)
    dirs = [rng.standard_normal(x.shape) for x in (q, k, v, bias)]
    with jax.enable_x64(True):
        for method, opts in (("blockwise", {"block_q": 4, "block_k": 8}), ("dense", {})):

            def loss(q, k, v, bias, method=method, opts=opts):
                out = ea.dot_product_attention(q, k, v, bias, dropout_rate=0.3,
                                               dropout_rng=jax.random.PRNGKey(1),
                                               method=method, **opts)  # fmt: skip
                return jnp.sum(jnp.sin(out))

            args = (q, k, v, bias)
            g = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(*args)
            loss = jax.jit(loss)
            eps = 1e-6
            plus = loss(*(a + eps * d for a, d in zip(args, dirs, strict=True)))
            minus = loss(*(a - eps * d for a, d in zip(args, dirs, strict=True)))
            fd = (plus - minus) / (2 * eps)
            an = sum(np.sum(np.asarray(gi) * d) for gi, d in zip(g, dirs, strict=True))
            np.testing.assert_allclose(an, fd, rtol=1e-6, err_msg=method)


def test_bad_input_names_the_argument():
    q, k, v = _inputs()
    cases = [
        (dict(bias=np.zeros((3, 4, 20, 20), np.float32)), "bias of shape"),
        (dict(mask=np.ones((2, 3, 20, 20), bool)), "mask of shape"),
        (dict(mask=np.ones((2, 1, 20, 20), np.float32)), "boolean"),
        (dict(dropout_rate=0.1), "dropout_rng"),
        (dict(dropout_rate=1.5, dropout_rng=jax.random.PRNGKey(0)), "dropout_rate"),
        (dict(q_segment_ids=np.zeros((2, 19), np.int32)), "q_segment_ids"),
        (dict(local_window_size=(2, -1)), "local_window_size"),
        (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
        (dict(sinks=np.zeros(3, np.float32)), "sinks"),
        (dict(query_seq_lengths=np.array([30, 2])), "query_seq_lengths"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            ea.dot_product_attention(q, k, v, **kw)
    # An argument the method cannot honour: named, with the methods that can.
    with pytest.raises(ValueError, match=r"cannot honour bias .*blockwise"):
        ea.dot_product_attention(q, k, v, np.zeros((20, 20), np.float32), method="local")
    with pytest.raises(ValueError, match=r"cannot honour logits_soft_cap .*blockwise"):
        ea.dot_product_attention(q, k, v, logits_soft_cap=3.0, method="xla")
    with pytest.raises(ValueError, match=r"cannot honour mask .*dense"):
        ea.dot_product_attention(q, k, v, mask=np.ones((20, 20), bool), method="linear_elu")
    with pytest.raises(ValueError, match=r"cannot honour sinks"):
        ea.dot_product_attention(q, k, v, sinks=np.zeros(4, np.float32), method="performer")


def test_linear_methods_honour_padding_and_causal_self_attention():
    q, k, v = _inputs()
    kv_len = jnp.array([20, 11])
    q_len = jnp.array([17, 20])
    out = ea.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_len,
                                   query_seq_lengths=q_len, method="linear_elu")  # fmt: skip
    ref = ea.attention(q, k, v, causal=True, kv_lengths=kv_len, method="linear_elu")
    rows = (np.arange(20)[None, :] < np.asarray(q_len)[:, None])[:, :, None, None]
    np.testing.assert_allclose(out, np.where(rows, ref, 0), atol=1e-6)


def test_support_table_comes_from_the_registry():
    table = dropin.support_table()
    assert table.count("\n") == len(ea.methods()) + 1
    line = next(r for r in table.splitlines() if r.startswith("| `blockwise`"))
    assert "-" not in line.split("|", 2)[2]  # blockwise honours every argument
    assert dropin.honours("xla", "bias") and not dropin.honours("xla", "sinks")
    assert not dropin.honours("local", "bias") and dropin.honours("local", "dropout")


# ---- Flax --------------------------------------------------------------------------------


def _flax_mask():
    seg = jnp.array([[0] * 10 + [1] * 14, [0] * 24])
    return nn.combine_masks(nn.make_attention_mask(seg, seg, jnp.equal), nn.make_causal_mask(seg))


@pytest.mark.parametrize("method", ["dense", "blockwise"])
def test_nnx_multi_head_attention_with_our_attention_fn_equals_its_default(method):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 24, 32))
    mask = _flax_mask()  # float32 [B, 1, T, T], as Flax builds it
    ours_fn = attention_fn(method, **EXACT[method])
    ref = nnx.MultiHeadAttention(4, 32, 32, rngs=nnx.Rngs(0), decode=False)
    ours = nnx.MultiHeadAttention(4, 32, 32, rngs=nnx.Rngs(0), decode=False, attention_fn=ours_fn)
    run = nnx.jit(lambda m, x, mask: m(x, mask=mask))
    expected = run(ref, x, mask)
    np.testing.assert_allclose(run(ours, x, mask), expected, atol=2e-5)
    np.testing.assert_allclose(run(ours, x, mask.astype(bool)), expected, atol=2e-5)


def test_linen_attention_with_our_attention_fn_equals_its_default():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 24, 32))
    mask = _flax_mask()
    ref = nn.MultiHeadDotProductAttention(num_heads=4)
    ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=attention_fn("blockwise"))
    params = ref.init(jax.random.PRNGKey(1), x, x, mask=mask)
    np.testing.assert_allclose(
        ours.apply(params, x, x, mask=mask), ref.apply(params, x, x, mask=mask), atol=2e-5
    )
    # Dropout runs (training mode) and is deterministic given the rng; eval mode has none.
    drop = nn.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.5,
                                           attention_fn=attention_fn("blockwise"))  # fmt: skip
    rngs = {"dropout": jax.random.PRNGKey(3)}
    a = drop.apply(params, x, x, mask=mask, deterministic=False, rngs=rngs)
    b = drop.apply(params, x, x, mask=mask, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(ref.apply(params, x, x, mask=mask))).max() > 1e-2
    np.testing.assert_allclose(
        drop.apply(params, x, x, mask=mask, deterministic=True), ref.apply(params, x, x, mask=mask),
        atol=2e-5,
    )  # fmt: skip


def test_attention_fn_refuses_what_it_cannot_honour():
    fn = attention_fn("blockwise")
    q = jnp.zeros((2, 8, 4, 8))
    with pytest.raises(ValueError, match="precision"):
        fn(q, q, q, precision=jax.lax.Precision.HIGHEST)
    with pytest.raises(ValueError, match="attention_weights"):
        fn(q, q, q, module=object())
    with pytest.raises(ValueError, match="unknown method"):
        attention_fn("nope")


def test_readme_shows_the_current_support_table():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    assert dropin.support_table() in readme, "regenerate with: efficient-attn methods --dropin"
