"""``ea.merge_attention`` over key partitions, and inputs with any number of leading batch dims."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from tests.conftest import make_qkv

SCALE = 0.3


def _merged(q, k, v, part, lengths):
    """Merge of dense attention over each key set ``part == i``, i < 5 (some sets empty)."""
    outs, lses = [], []
    for i in range(5):
        mod = lambda b, h, q_idx, kv_idx, i=i: part[kv_idx] == i  # noqa: E731
        o, lse = ea.attention(q, k, v, method="dense", scale=SCALE, kv_lengths=lengths,
                              mask_mod=mod, return_lse=True)  # fmt: skip
        outs.append(o)
        lses.append(lse)
    return ea.merge_attention(outs, lses)


def test_merge_of_random_key_partitions_equals_the_whole_with_gradients():
    """2-5 random disjoint key sets (the rest empty, and some empty for some rows) merge to
    full attention: values against float64, gradients (through out and lse) against dense."""
    q, k, v = make_qkv(2, 11, 23, 4, 2, 8)
    lengths = jnp.array([23, 9])  # example 1: the keys past 9 are padding, some parts see none
    ref_out = ea.numpy_reference(q, k, v, kv_lengths=np.asarray(lengths), scale=SCALE)[0]
    logits = SCALE * np.einsum("bqkgh,bskh->bqkgs", q.reshape(2, 11, 2, 2, 8).astype(np.float64),
                               k.astype(np.float64)).reshape(2, 11, 4, 23)  # fmt: skip
    logits[1, ..., 9:] = -np.inf
    top = logits.max(-1)
    ref_lse = np.log(np.exp(logits - top[..., None]).sum(-1)) + top  # [B, T, N]
    rng = np.random.default_rng(0)
    d_out = rng.standard_normal(q.shape).astype(np.float32)
    d_lse = rng.standard_normal(q.shape[:3]).astype(np.float32)

    def loss(out, lse):
        return jnp.sum(out * d_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * d_lse)

    def whole(q, k, v):
        return loss(*ea.attention(q, k, v, method="dense", scale=SCALE, kv_lengths=lengths,
                                  return_lse=True))  # fmt: skip

    g_ref = jax.jit(jax.grad(whole, (0, 1, 2)))(q, k, v)
    merged = jax.jit(_merged)
    grads = jax.jit(jax.grad(lambda q, k, v, part: loss(*_merged(q, k, v, part, lengths)),
                             (0, 1, 2)))  # fmt: skip
    for count in range(2, 6):
        part = jnp.asarray(rng.permutation(np.arange(23) % count).astype(np.int32))
        out, lse = merged(q, k, v, part, lengths)
        np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5, atol=2e-6)
        g = grads(q, k, v, part)
        for name, a, r in zip(("dq", "dk", "dv"), g, g_ref, strict=True):
            np.testing.assert_allclose(a, r, rtol=1e-4, atol=2e-5, err_msg=f"{count}: {name}")


def test_merge_of_empty_partials_is_zero_without_nan():
    """A partial with lse = -inf contributes nothing (whatever its out holds); rows no partial
    sees are zero with lse = -inf; gradients stay finite."""
    out1 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)), jnp.bfloat16)
    lse1 = jnp.array([[0.5, -jnp.inf, 2.0], [-jnp.inf, -jnp.inf, 1.0]])
    junk = jnp.full(out1.shape, jnp.nan, jnp.bfloat16)  # an empty partial's out is ignored
    lse2 = jnp.full(lse1.shape, -jnp.inf)

    def f(o, l1, l2):
        out, lse = ea.merge_attention([o, junk], [l1, l2])
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

    out, lse = ea.merge_attention([out1, junk], [lse1, lse2])
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse1))
    np.testing.assert_array_equal(np.asarray(out, np.float32)[~np.isfinite(lse1)], 0)
    np.testing.assert_array_equal(np.asarray(out), np.where(np.isfinite(lse1)[..., None], out1, 0))
    for g in jax.grad(f, (0, 1, 2))(out1, lse1, lse2):
        assert np.isfinite(np.asarray(g, np.float32)).all()


def test_merge_bad_input_says_what_to_pass():
    o, lse = jnp.zeros((2, 5, 4, 8)), jnp.zeros((2, 5, 4))
    cases = [
        (([o, jnp.zeros((2, 6, 4, 8))], [lse, lse]), r"outs\[1\] has shape .* same queries"),
        (([o, o], [lse, jnp.zeros((2, 5))]), r"lses\[1\] has shape .* without the value dim"),
        (([o, o], [lse]), "one lse per out"),
        (([], []), "at least one"),
        ((o, lse), "a sequence of outs"),
        (([o], [lse.astype(jnp.int32)]), "floating-point"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            ea.merge_attention(*args)


def _flat(x, lead):
    return x.reshape(-1, *x.shape[lead:])


@pytest.mark.parametrize("lead", [(2, 3), (2, 1, 2)], ids=["rank5", "rank6"])
def test_rank5_and_rank6_attention_equals_the_flattened_call(lead):
    """Leading dims [2, 3] and [2, 1, 2]: out, lse and gradients equal the [B, ...] call;
    kv_lengths [...] and a bias broadcast over some leading dims follow them."""
    b = int(np.prod(lead))
    q, k, v = (x.reshape(*lead, *x.shape[1:]) for x in make_qkv(b, 9, 13, 4, 2, 8))
    lengths = np.arange(b).reshape(lead) % 3 + 10
    bias = np.random.default_rng(1).standard_normal((lead[-1], 1, 9, 13)).astype(np.float32)
    kw = {"method": "dense", "causal": True, "scale": SCALE, "return_lse": True}

    def multi(q, k, v, bias):
        return ea.attention(q, k, v, kv_lengths=lengths, bias=bias, **kw)

    def flat(q, k, v, bias):
        full = jnp.broadcast_to(bias, (*lead, 1, 9, 13)).reshape(b, 1, 9, 13)
        return ea.attention(*(_flat(x, len(lead)) for x in (q, k, v)), bias=full,
                            kv_lengths=lengths.reshape(b), **kw)  # fmt: skip

    def run(f):  # (out, lse), and the gradients of a loss of both
        def loss(*args):
            out, lse = f(*args)
            return jnp.sum(jnp.sin(out)) + jnp.sum(lse), (out, lse)

        return jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True))(q, k, v, bias)

    g, (out, lse) = run(multi)
    g_ref, (ref_out, ref_lse) = run(flat)
    assert out.shape == (*lead, 9, 4, 8) and lse.shape == (*lead, 9, 4)
    np.testing.assert_array_equal(_flat(np.asarray(out), len(lead)), ref_out)
    np.testing.assert_array_equal(_flat(np.asarray(lse), len(lead)), ref_lse)
    for a, r in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=rf"kv_lengths must have shape .*\[{lead[0]}, "):
        ea.attention(q, k, v, kv_lengths=np.array([3, 4, 5]))


def test_rank6_drop_in_equals_the_flattened_call():
    """The drop-in with leading dims [2, 1, 2]: segment ids [..., T], lengths [...], a mask
    [1, 2, N, T, S] broadcast over the leading dims and sinks equal the flattened call."""
    lead, b = (2, 1, 2), 4
    q, k, v = (x.reshape(*lead, *x.shape[1:]) for x in make_qkv(b, 10, 10, 4, 2, 8))
    rng = np.random.default_rng(2)
    seg = np.sort(rng.integers(0, 3, (*lead, 10)), -1).astype(np.int32)
    q_len = np.array([10, 7, 9, 10]).reshape(lead)
    mask = rng.random((1, 2, 4, 10, 10)) < 0.8
    sinks = rng.standard_normal(4).astype(np.float32)
    kw = {"is_causal": True, "sinks": sinks, "return_residual": True, "method": "dense"}
    out, lse = jax.jit(lambda *a, **x: ea.dot_product_attention(*a, **x, **kw))(
        q, k, v, mask=mask, q_segment_ids=seg, query_seq_lengths=q_len
    )
    full_mask = np.broadcast_to(mask, (*lead, 4, 10, 10)).reshape(b, 4, 10, 10)
    ref_out, ref_lse = jax.jit(lambda *a, **x: ea.dot_product_attention(*a, **x, **kw))(
        *(_flat(x, 3) for x in (q, k, v)),
        mask=full_mask,
        q_segment_ids=seg.reshape(b, 10),
        query_seq_lengths=q_len.reshape(b),
    )
    assert out.shape == (*lead, 10, 4, 8) and lse.shape == (*lead, 10, 4)
    np.testing.assert_array_equal(_flat(np.asarray(out), 3), ref_out)
    np.testing.assert_array_equal(_flat(np.asarray(lse), 3), ref_lse)
    with pytest.raises(ValueError, match="q_segment_ids must have shape"):
        ea.dot_product_attention(q, k, v, q_segment_ids=seg[0])
    with pytest.raises(ValueError, match="does not broadcast"):
        ea.dot_product_attention(q, k, v, mask=np.ones((3, 4, 10, 10), bool))
