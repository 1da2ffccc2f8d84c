"""The NNX layer and models: equal to the linen ones, packed sequences, training."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient_attn import nn as linen
from efficient_attn import nnx as ennx

D, HEADS, HEAD_DIM = 16, 4, 4
T = 8  # one length (and width, heads) everywhere: eager ops compile once per shape
LM = ennx.ModelConfig(
    vocab_size=11, max_len=16, d_model=D, num_layers=2, num_heads=HEADS, num_kv_heads=2
)


@nnx.jit
def _call(module, *args, segment_ids=None):
    """``module(*args, segment_ids=...)`` compiled once per shape (eager tiles are slow)."""
    return module(*args) if segment_ids is None else module(*args, segment_ids=segment_ids)


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "method, kw",
    [
        ("dense", {}),
        ("additive", {"sizes": {"A": 6}}),  # learned required arrays
        ("gla", {"causal": True}),  # per-token arrays through a low-rank projection
        ("retnet", {"causal": True, "options": {"gamma": np.array([0.9, 0.6])}}),  # fixed array
    ],
)
def test_layer_equals_linen_layer_with_the_same_params(method, kw):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, T, D))
    lin = linen.MultiHeadAttention(HEADS, HEAD_DIM, num_kv_heads=2, method=method, **kw)
    params = lin.init(jax.random.PRNGKey(1), x)
    layer = ennx.MultiHeadAttention(
        D, HEADS, HEAD_DIM, num_kv_heads=2, method=method, **kw, rngs=nnx.Rngs(0)
    )
    assert abs(float(layer(x).sum() - lin.apply(params, x).sum())) > 1e-3  # fresh params differ
    ennx.load_linen(layer, params)
    out = layer(x)
    assert out.shape == (2, T, D)
    _close(out, lin.apply(params, x))
    _close(layer.weights(x), lin.apply(params, x, method=linen.MultiHeadAttention.weights))


def test_cross_attention_and_kv_lengths_equal_linen():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, T, D))
    ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 12))  # [B, Tk, D']
    lengths = jnp.array([11, 4])
    lin = linen.MultiHeadAttention(HEADS, HEAD_DIM, out_features=8)
    params = lin.init(jax.random.PRNGKey(2), x, ctx)
    layer = ennx.MultiHeadAttention(
        D, HEADS, HEAD_DIM, context_features=12, out_features=8, rngs=nnx.Rngs(0)
    )
    ennx.load_linen(layer, params)
    out = layer(x, ctx, kv_lengths=lengths)
    assert out.shape == (2, T, 8)
    _close(out, lin.apply(params, x, ctx, kv_lengths=lengths))


def test_decoder_lm_equals_linen_decoder_lm_with_the_same_params():
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, T), 0, LM.vocab_size)
    lin = linen.DecoderLM(LM)
    params = lin.init(jax.random.PRNGKey(1), tokens)
    model = ennx.load_linen(ennx.DecoderLM(LM, rngs=nnx.Rngs(0)), params)
    logits = model(tokens)
    assert logits.shape == (2, T, LM.vocab_size)
    _close(logits, lin.apply(params, tokens))
    one_doc = jnp.zeros_like(tokens)  # a single segment changes nothing
    _close(model(tokens, segment_ids=one_doc), logits)


def test_classifier_equals_linen_classifier():
    c = dataclasses.replace(LM, num_layers=1, num_classes=3, pooling="cls")
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, T - 1), 0, 11)  # + a class token
    lengths = jnp.array([T - 1, 4])
    lin = linen.Classifier(c)
    params = lin.init(jax.random.PRNGKey(1), tokens, lengths)
    model = ennx.load_linen(ennx.Classifier(c, rngs=nnx.Rngs(0)), params)
    logits = model(tokens, lengths)
    assert logits.shape == (2, 3)
    _close(logits, lin.apply(params, tokens, lengths))


def test_encoder_decoder_and_greedy_decoding_equal_linen():
    c = dataclasses.replace(LM, num_layers=1)
    sources = jax.random.randint(jax.random.PRNGKey(0), (2, T), 1, 11)
    inputs = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, 11)
    lin = linen.EncoderDecoder(c)
    params = lin.init(jax.random.PRNGKey(2), sources, inputs)
    model = ennx.load_linen(ennx.EncoderDecoder(c, rngs=nnx.Rngs(0)), params)
    _close(model(sources, inputs), lin.apply(params, sources, inputs))
    decoded = ennx.greedy_decode(model, sources, length=T, bos=0)
    assert decoded.shape == (2, T)
    np.testing.assert_array_equal(decoded, linen.greedy_decode(lin, params, sources, T, 0))


def test_packed_documents_equal_separate_documents():
    c = dataclasses.replace(
        LM, num_layers=1, method="blockwise", options={"block_q": 4, "block_k": 4}
    )
    model = ennx.DecoderLM(c, rngs=nnx.Rngs(0))
    a = jax.random.randint(jax.random.PRNGKey(1), (1, 5), 0, 11)
    b = jax.random.randint(jax.random.PRNGKey(2), (1, 7), 0, 11)
    packed = jnp.concatenate([a, b], axis=1)  # [1, 12]: two documents in one row
    segment_ids = jnp.array([[0] * 5 + [1] * 7])
    np.testing.assert_array_equal(
        ennx.segment_positions(segment_ids), [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]
    )
    out = _call(model, packed, segment_ids=segment_ids)
    _close(out[:, :5], _call(model, a), 1e-4)
    _close(out[:, 5:], _call(model, b), 1e-4)
    mixed = _call(model, packed)[:, 5:]  # without segment ids, b sees a
    assert float(jnp.abs(mixed - _call(model, b)).max()) > 1e-3


def test_training_with_optax_and_nnx_optimizer_reduces_loss():
    model = ennx.DecoderLM(dataclasses.replace(LM, num_layers=1), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    tokens = jnp.tile(jnp.arange(12) % 5, (4, 1))  # [4, 12]: next token is (t + 1) % 5
    segment_ids = jnp.array([[0] * 6 + [1] * 6] * 4)  # two packed documents per row

    def loss_fn(model):
        logits = model(tokens[:, :-1], segment_ids=segment_ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(15)]
    assert losses[-1] < 0.3 * losses[0], losses


def test_segment_ids_with_a_method_that_cannot_mask_name_those_that_can():
    layer = ennx.MultiHeadAttention(D, HEADS, HEAD_DIM, method="linear_elu", rngs=nnx.Rngs(0))
    x = jnp.ones((1, 6, D))
    ids = jnp.array([[0, 0, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"'linear_elu' does not.*dense.*blockwise"):
        layer(x, segment_ids=ids)
    dense = ennx.MultiHeadAttention(D, HEADS, HEAD_DIM, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, D))
    w = np.asarray(dense.weights(x, segment_ids=ids))  # [1, N, 6, 6]: block-diagonal
    same = np.equal.outer(ids[0], ids[0])
    assert (w[..., ~same] == 0).all() and (w[..., same] > 0).all()
    _close(w.sum(-1), np.ones((1, HEADS, 6)))
    with pytest.raises(ValueError, match=r"segment_ids must be int \[batch, 6\]"):
        dense(x, segment_ids=ids[:, :4])
    with pytest.raises(ValueError, match="context=None"):
        dense(x, x, segment_ids=ids)


def test_bad_configs_and_params_are_clear_errors():
    with pytest.raises(ValueError, match="must be a multiple"):
        ennx.MultiHeadAttention(D, 4, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown option"):
        ennx.MultiHeadAttention(D, 4, 4, options={"nope": 1}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pooling='max'; valid: mean, cls"):
        ennx.Classifier(ennx.ModelConfig(num_classes=2, pooling="max"), rngs=nnx.Rngs(0))
    cls = ennx.Classifier(dataclasses.replace(LM, num_classes=2, pooling="cls"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="segment_ids need pooling='mean'"):
        cls(jnp.zeros((1, T), jnp.int32), jnp.array([T]), segment_ids=jnp.zeros((1, T), jnp.int32))
    lm = ennx.DecoderLM(LM, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"segment_ids must be int \[batch, seq\]"):
        lm(jnp.zeros((1, T), jnp.int32), segment_ids=jnp.zeros((1, T + 1), jnp.int32))
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        lm(jnp.zeros((1, 17), jnp.int32))
    params = nnx.state(lm, nnx.Param).to_pure_dict()
    linen_params = {k: v for k, v in params.items() if k != "blocks"}
    with pytest.raises(ValueError, match="missing"):
        ennx.load_linen(lm, {"params": linen_params})


def test_linen_layer_takes_segment_ids_like_the_nnx_one():
    """The linen layer's ``segment_ids`` equal running each packed document on its own."""
    from efficient_attn.nn import MultiHeadAttention as LinenMHA

    layer = LinenMHA(num_heads=2, head_dim=8, method="blockwise", causal=True,
                     options={"block_q": 8, "block_k": 8})  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 20, 16))
    seg = jnp.asarray([[0] * 7 + [1] * 13])
    params = layer.init(jax.random.PRNGKey(1), x)
    packed = jax.jit(lambda x: layer.apply(params, x, segment_ids=seg))(x)
    first = layer.apply(params, x[:, :7])
    second = layer.apply(params, x[:, 7:])
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="mask_mod"):
        LinenMHA(num_heads=2, head_dim=8, method="linear_elu", causal=True).init(
            jax.random.PRNGKey(1), x, segment_ids=seg
        )
