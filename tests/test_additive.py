"""Additive (Bahdanau) attention: array options, default scale, tiling, the Flax layer.

The conformance suite covers the shared behaviour (masks, GQA, empty rows,
weights, gradients against the float64 formula); these tests cover what is
particular to a method with learned array options.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.methods.additive import additive_reference
from efficient_attn.nn import MultiHeadAttention
from tests.conftest import make_qkv, method_arrays, rel_err


def test_missing_or_misshaped_arrays_are_clear_errors():
    q, k, v = make_qkv(head_dim=16)
    arrays = method_arrays("additive", 16)
    with pytest.raises(ValueError, match=r"requires array option\(s\) \['score_vector'\]"):
        ea.attention(q, k, v, method="additive", **{**arrays, "score_vector": None})
    with pytest.raises(ValueError, match="init_arrays"):
        ea.attention(q, k, v, method="additive")
    bad = {**arrays, "query_proj": np.zeros((8, 64), np.float32)}  # H=8, but head_dim is 16
    with pytest.raises(ValueError, match="query_proj has H=8"):
        ea.attention(q, k, v, method="additive", **bad)
    bad = {**arrays, "score_vector": np.zeros((32,), np.float32)}  # A != projections' A
    with pytest.raises(ValueError, match="score_vector has A=32"):
        ea.attention(q, k, v, method="additive", **bad)
    with pytest.raises(ValueError, match="must have shape"):
        ea.attention(q, k, v, method="additive", **{**arrays, "score_vector": np.zeros((2, 64))})
    with pytest.raises(ValueError, match="no size"):
        ea.init_arrays("additive", jax.random.PRNGKey(0), 16, Z=3)


def test_init_arrays_shapes_and_sizes():
    made = ea.init_arrays("additive", jax.random.PRNGKey(0), 24, A=40)
    assert {n: x.shape for n, x in made.items()} == {
        "query_proj": (24, 40),
        "key_proj": (24, 40),
        "score_vector": (40,),
    }
    assert ea.init_arrays("dense", jax.random.PRNGKey(0), 24) == {}


def test_default_scale_is_one():
    q, k, v = make_qkv(head_dim=16)
    arrays = method_arrays("additive", 16)
    default = np.asarray(ea.attention(q, k, v, method="additive", **arrays))
    one = np.asarray(ea.attention(q, k, v, method="additive", scale=1.0, **arrays))
    root = np.asarray(ea.attention(q, k, v, method="additive", scale=0.25, **arrays))
    np.testing.assert_array_equal(default, one)
    assert not np.allclose(default, root)
    assert rel_err(default, additive_reference(q, k, v, scale=1.0, **arrays)) < 2e-5


@pytest.mark.parametrize("block_q,block_k", [(1, 1), (5, 3), (64, 64)])
def test_any_tiling_matches_the_formula(block_q, block_k):
    q, k, v = make_qkv(q_len=19, kv_len=23, heads=4, kv_heads=1, head_dim=8)
    arrays = method_arrays("additive", 8)
    lengths = np.array([23, 11])
    kw = {"causal": True, "kv_lengths": lengths}
    out = ea.attention(q, k, v, method="additive", block_q=block_q, block_k=block_k, **kw, **arrays)
    assert rel_err(out, additive_reference(q, k, v, **kw, **arrays)) < 2e-5


def test_never_materialises_the_pairs_by_hidden_tensor():
    """Compiled temporary memory stays far below one [B, N, Tq, Tk, A] float32 tensor."""
    b, t, n, h, a = 1, 512, 2, 32, 64
    q = jnp.zeros((b, t, n, h))
    arrays = ea.init_arrays("additive", jax.random.PRNGKey(0), h, A=a)

    def loss(q, k, v):
        return jnp.sum(ea.attention(q, k, v, method="additive", causal=True, **arrays))

    exe = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    full_hidden = b * n * t * t * a * 4
    assert exe.memory_analysis().temp_size_in_bytes < full_hidden / 8


def test_flax_layer_learns_the_arrays():
    layer = MultiHeadAttention(num_heads=2, head_dim=8, method="additive", sizes={"A": 12})
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
    params = layer.init(jax.random.PRNGKey(1), x)
    p = params["params"]
    assert p["query_proj"].shape == (8, 12) and p["score_vector"].shape == (12,)

    def loss(params):
        return jnp.sum(layer.apply(params, x) ** 2)

    grads = jax.grad(loss)(params)["params"]
    for name in ("query_proj", "key_proj", "score_vector"):
        assert np.abs(np.asarray(grads[name])).max() > 0, name
    w = layer.apply(params, x, method=MultiHeadAttention.weights)
    assert w.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-5)
