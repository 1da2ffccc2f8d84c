"""The API's validation and the registry: clear ValueErrors, nothing silently ignored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from tests.conftest import make_qkv


def test_methods_lists_core_methods():
    names = ea.methods()
    assert isinstance(names, tuple)
    assert {"dense", "blockwise", "xla", "cudnn"} <= set(names)
    assert ea.get_method("dense").exact and ea.get_method("blockwise").exact
    assert ea.get_method("blockwise").options == {
        "block_q": None, "block_k": None, "implementation": "auto", "interpret": False,
        "kernel_config": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((5, 4), (5, 4, 8), (5, 4, 8)), r"query must have rank >= 3 \[..., seq"),
        (((2, 5, 4), (2, 5, 4, 8), (2, 5, 4, 8)), "must have the same rank"),
        (((2, 5, 4, 8), (2, 5, 4, 8, 1), (2, 5, 4, 8)), "must have the same rank"),
        (((2, 2, 5, 4, 8), (2, 3, 5, 4, 8), (2, 3, 5, 4, 8)), r"batch sizes differ: query \(2,"),
        (((2, 5, 4, 8), (2, 5, 4, 6), (2, 5, 4, 8)), r"head_dim of query \(8\) and key \(6\)"),
        (((2, 5, 4, 8), (2, 5, 4, 8), (2, 6, 4, 8)), "key and value lengths must be equal"),
        (
            ((2, 5, 4, 8), (2, 5, 3, 8), (2, 5, 3, 8)),
            "N=4 must be a multiple of key/value heads K=3",
        ),
        (((2, 5, 4, 8), (3, 5, 4, 8), (3, 5, 4, 8)), "batch sizes differ"),
    ],
)
def test_shape_errors(shapes, match):
    q, k, v = (np.zeros(s, np.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ea.attention(q, k, v)


def test_dtype_errors():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="share a dtype"):
        ea.attention(q, k.astype(np.float16), v)
    with pytest.raises(ValueError, match="floating-point"):
        ea.attention(q.astype(np.int32), k, v)


@pytest.mark.parametrize(
    "lengths,match",
    [
        (np.array([3, -1]), r"must lie in \[0, Tk=13\]"),
        (np.array([3, 14]), r"must lie in \[0, Tk=13\]"),
        (np.array([3]), "shape"),
        (np.array([3.0, 4.0]), "integer"),
    ],
)
def test_kv_lengths_errors(lengths, match):
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match=match):
        ea.attention(q, k, v, kv_lengths=lengths)


def test_unknown_method_lists_registered_names():
    q, k, v = make_qkv()
    with pytest.raises(
        ValueError, match=r"unknown method 'nope'; registered methods: dense, .*blockwise"
    ):
        ea.attention(q, k, v, method="nope")


def test_unknown_option_lists_valid_options():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['window'\].*block_k, block_q"):
        ea.attention(q, k, v, method="blockwise", window=4)
    with pytest.raises(ValueError, match="valid options: none"):
        ea.attention(q, k, v, method="dense", block_q=4)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_option_values(bad):
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="must be a positive int"):
        ea.attention(q, k, v, method="blockwise", block_q=bad)


def test_causal_must_be_bool():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="causal must be a bool"):
        ea.attention(q, k, v, causal="yes")


def test_unavailable_method_is_a_clear_error():
    if ea.get_method("cudnn").available() is None:
        pytest.skip("cuDNN is available here")
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="'cudnn' is not available here: cuDNN"):
        ea.attention(q, k, v, method="cudnn")


def test_registering_a_method_with_limited_features():
    @ea.register_method("_test_limited", exact=True, supports=("grad",))
    def limited(q, k, v, *, causal, kv_lengths, scale, width: int = 3):
        """A test method."""
        return ea.attention(q, k, v, method="dense", scale=scale)

    try:
        spec = ea.get_method("_test_limited")
        assert spec.options == {"width": 3} and spec.description == "A test method."
        q, k, v = make_qkv(heads=4, kv_heads=4)
        ea.attention(q, k, v, method="_test_limited", width=5)
        with pytest.raises(ValueError, match=r"does not support \['causal'\]"):
            ea.attention(q, k, v, method="_test_limited", causal=True)
        with pytest.raises(ValueError, match=r"does not support \['kv_lengths'\]"):
            ea.attention(q, k, v, method="_test_limited", kv_lengths=np.array([3, 4]))
        q2, k2, v2 = make_qkv(heads=4, kv_heads=2)
        with pytest.raises(ValueError, match=r"does not support \['gqa'\]"):
            ea.attention(q2, k2, v2, method="_test_limited")
        with pytest.raises(ValueError, match="already registered"):
            ea.register_method("_test_limited", exact=True)(limited)
    finally:
        ea.core.registry.unregister_method("_test_limited")
    assert "_test_limited" not in ea.methods()


def test_registration_errors():
    with pytest.raises(ValueError, match="must provide weights="):
        ea.register_method("_x", exact=False)
    with pytest.raises(ValueError, match="unknown feature"):
        ea.register_method("_x", exact=True, supports=("telepathy",))
    with pytest.raises(TypeError, match="needs a default"):

        @ea.register_method("_x", exact=True)
        def no_default(q, k, v, *, causal, kv_lengths, scale, width):
            return q

    assert "_x" not in ea.methods()


def test_sparsity_pattern_errors():
    with pytest.raises(ValueError, match="has no sparsity pattern"):
        ea.sparsity_pattern("dense", 4, 4)


def test_default_scale_and_explicit_scale():
    q, k, v = make_qkv()
    ref, _ = ea.numpy_reference(q, k, v, scale=0.3)
    out = ea.attention(q, k, v, method="blockwise", scale=0.3)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-6)


def test_scale_is_differentiable_and_traceable():
    q, k, v = make_qkv()

    def loss(scale, method):
        return jnp.sum(ea.attention(q, k, v, method=method, causal=True, scale=scale) ** 2)

    for method in ("dense", "blockwise"):
        g = jax.grad(loss)(0.4, method)
        eps = 1e-3
        fd = (loss(0.4 + eps, method) - loss(0.4 - eps, method)) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=2e-2)
    jitted = jax.jit(lambda s: ea.attention(q, k, v, method="blockwise", scale=s))
    np.testing.assert_allclose(
        np.asarray(jitted(0.2)),
        np.asarray(ea.attention(q, k, v, method="dense", scale=0.2)),
        rtol=2e-5,
        atol=2e-6,
    )


def test_kv_lengths_may_be_traced():
    q, k, v = make_qkv()
    f = jax.jit(lambda lengths: ea.attention(q, k, v, method="blockwise", kv_lengths=lengths))
    ref, _ = ea.numpy_reference(q, k, v, kv_lengths=np.array([5, 13]))
    np.testing.assert_allclose(np.asarray(f(jnp.array([5, 13]))), ref, rtol=2e-5, atol=2e-6)


def test_eager_calls_run_one_cached_program_and_see_arrays_changed_in_place():
    """An eager call compiles the method once per shape and options (kept in
    ``core.eager``'s cache); NumPy arrays are keyed by contents, so one changed in
    place is seen; a call closing over a plain function is never kept."""
    from efficient_attn.core import eager

    q, k, v = make_qkv(batch=2, q_len=9, kv_len=9, heads=2, kv_heads=2, head_dim=8)
    lengths = np.array([9, 4])
    kw = {"method": "dense", "kv_lengths": lengths}
    eager._CACHE.clear()  # a full cache (other tests' programs) would evict instead of grow
    before = len(eager._CACHE)
    first = np.asarray(ea.attention(q, k, v, **kw))
    again = np.asarray(ea.attention(q + 1.0, k, v, **kw))
    assert len(eager._CACHE) == before + 1  # the second call reused the first's program
    assert not np.allclose(first, again)
    lengths[1] = 9  # in place: a new key, and the result of a call with [9, 9]
    np.testing.assert_allclose(
        np.asarray(ea.attention(q, k, v, **kw)),
        np.asarray(ea.attention(q, k, v, method="dense", kv_lengths=np.array([9, 9]))),
    )
    jitted = jax.jit(lambda q: ea.attention(q, k, v, **kw))(q)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(ea.attention(q, k, v, **kw)))
    size = len(eager._CACHE)
    window = lambda b, h, i, j: jnp.abs(i - j) <= 2  # noqa: E731
    ea.attention(q, k, v, method="dense", mask_mod=window)
    assert len(eager._CACHE) == size
