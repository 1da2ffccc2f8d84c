"""Sparse family (local, strided, bigbird) and the block-sparse engine.

The conformance suite checks every method against dense softmax restricted to
its pattern at default options; here: the patterns themselves, the engine's
plans with small tiles (many tiles, lengths that are not tile multiples),
gradients, bf16, option errors and the amount of skipped work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn import blocksparse, masking
from efficient_attn.methods import sparse
from tests.conftest import make_qkv, rel_err

BIGBIRD = {"block": 8, "num_global_blocks": 2, "num_random_blocks": 2, "seed": 3}


# ---- patterns -----------------------------------------------------------------


def test_local_window_is_exactly_as_documented():
    causal = ea.sparsity_pattern("local", 5, 5, causal=True, window=2)
    np.testing.assert_array_equal(causal, np.tri(5, dtype=bool) & ~np.tri(5, k=-2, dtype=bool))
    full = ea.sparsity_pattern("local", 5, 5, window=2)
    np.testing.assert_array_equal(full, np.abs(np.subtract.outer(range(5), range(5))) < 2)
    cross = ea.sparsity_pattern("local", 2, 6, causal=True, window=3)  # a_i = i + 4
    np.testing.assert_array_equal(cross, [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    assert (ea.sparsity_pattern("local", 40, 40, causal=True, window=7).sum(1)[6:] == 7).all()


def test_strided_has_window_plus_summary_columns():
    tq = tk = 40
    p = ea.sparsity_pattern("strided", tq, tk, window=3, stride=8)
    local = ea.sparsity_pattern("local", tq, tk, window=3)
    summary = np.arange(tk) % 8 == 7
    assert p[:, summary].all()
    np.testing.assert_array_equal(p[:, ~summary], local[:, ~summary])
    pc = ea.sparsity_pattern("strided", tq, tk, causal=True, window=3, stride=8)
    np.testing.assert_array_equal(pc, p & np.tri(tq, dtype=bool))


def _blocks(pattern, block):
    nb = pattern.shape[0] // block
    return pattern.reshape(nb, block, nb, block).any(axis=(1, 3))


def test_bigbird_global_sliding_and_random_blocks():
    block, nb = 4, 12
    opts = {"block": block, "num_global_blocks": 2, "num_random_blocks": 3, "seed": 0}
    blocks = _blocks(ea.sparsity_pattern("bigbird", nb * block, nb * block, **opts), block)
    assert blocks[[0, -1]].all() and blocks[:, [0, -1]].all()  # first and last block global
    band = np.abs(np.subtract.outer(range(nb), range(nb))) <= 1
    assert blocks[band].all()
    assert (blocks[2:-2].sum(1) == 3 + 2 + 3).all()  # sliding + global + random
    assert (blocks[[1, -2]].sum(1) == 2 + 2 + 3).all()  # a neighbour is global
    causal = _blocks(ea.sparsity_pattern("bigbird", nb * block, nb * block, causal=True, **opts), 4)
    assert not np.triu(causal, k=1).any()  # no future random blocks
    assert causal[:, :2].sum() == np.tril(np.ones((nb, 2), bool)).sum()  # globals at the start
    assert not causal[2:, 2:].all(axis=0).any()  # no other column is seen by every later block
    assert (causal[6:].sum(1) == 2 + 2 + 3).all()


def test_bigbird_random_blocks_depend_on_seed_only():
    p = [ea.sparsity_pattern("bigbird", 96, 96, **{**BIGBIRD, "seed": s}) for s in (3, 3, 4)]
    np.testing.assert_array_equal(p[0], p[1])
    assert (p[0] != p[2]).any()
    assert p[0].sum() == p[2].sum()


# ---- the engine: plans against patterns, outputs and gradients against float64 -----------


def _plans(tq, tk, causal):
    yield "local", sparse.local_plan(tq, tk, causal=causal, window=20, tile=16), {"window": 20}
    opts = {"window": 9, "stride": 7}
    yield "strided", sparse.strided_plan(tq, tk, causal=causal, tile=16, **opts), opts
    yield "bigbird", sparse.bigbird_plan(tq, tk, causal=causal, **BIGBIRD), BIGBIRD


@pytest.mark.parametrize("tq,tk", [(77, 77), (45, 130), (130, 45), (200, 333)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_plan_computes_every_pattern_pair_exactly_once(tq, tk, causal):
    for name, plan, opts in _plans(tq, tk, causal):
        counts = blocksparse.plan_mask(plan, tq, tk, counts=True)
        assert counts.max() <= 1, name
        np.testing.assert_array_equal(
            counts == 1, ea.sparsity_pattern(name, tq, tk, causal=causal, **opts), err_msg=name
        )


CASES = [  # (method, Tq, Tk, N, K, causal, kv_lengths)
    pytest.param("local", 150, 150, 4, 2, True, (90, 37), id="local-T150-gqa-causal-pad"),
    pytest.param("local", 70, 150, 2, 1, False, None, id="local-Tq70-Tk150-mqa"),
    pytest.param("strided", 150, 150, 4, 4, True, (100, 60), id="strided-T150-causal-pad"),
    pytest.param("strided", 95, 61, 4, 2, False, (61, 20), id="strided-Tq95-Tk61-gqa-pad"),
    pytest.param("bigbird", 150, 150, 4, 2, False, (83, 50), id="bigbird-T150-gqa-pad"),
    pytest.param("bigbird", 61, 150, 2, 1, True, None, id="bigbird-Tq61-Tk150-mqa-causal"),
]


def _plan_for(method, tq, tk, causal):
    return next(plan for name, plan, _ in _plans(tq, tk, causal) if name == method)


@pytest.mark.parametrize("method,tq,tk,n,kh,causal,kv_lengths", CASES)
def test_many_tiles_match_float64_reference_with_gradients(
    method, tq, tk, n, kh, causal, kv_lengths
):
    plan = _plan_for(method, tq, tk, causal)
    assert plan.nq > 3 and plan.nk > 3
    mask = blocksparse.plan_mask(plan, tq, tk)
    q, k, v = make_qkv(2, tq, tk, n, kh, 16, seed=1)
    dout = np.random.default_rng(2).standard_normal((2, tq, n, 16)).astype(np.float32)
    lengths = None if kv_lengths is None else np.array(kv_lengths)
    kv_len = masking.full_kv_lengths(lengths, 2, tk)

    @jax.jit
    def f(q, k, v, dout):
        out, vjp = jax.vjp(lambda *x: blocksparse.attend(*x, kv_len, 0.25, plan), q, k, v)
        return (out, *vjp(dout))

    got = f(q, k, v, dout)
    kw = {"causal": causal, "kv_lengths": lengths, "scale": 0.25, "mask": mask}
    refs = (ea.numpy_reference(q, k, v, **kw)[0], *ea.numpy_reference_grads(q, k, v, dout, **kw))
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, refs, strict=True):
        assert rel_err(x, ref) < 2e-5, (name, rel_err(x, ref))


def test_scale_gradient_matches_dense_restricted_to_pattern():
    tq = tk = 70
    plan = sparse.strided_plan(tq, tk, causal=True, window=9, stride=7, tile=16)
    mask = jnp.asarray(blocksparse.plan_mask(plan, tq, tk))
    q, k, v = (jnp.asarray(x) for x in make_qkv(1, tq, tk, 2, 2, 8))
    kv_len = jnp.array([tk], jnp.int32)

    def fast(scale):
        return jnp.sum(jnp.sin(blocksparse.attend(q, k, v, kv_len, scale, plan)))

    def dense(scale):
        s = jnp.einsum("bqnh,bknh->bnqk", q, k) * scale
        w = masking.safe_softmax(s, mask & jnp.tri(tq, dtype=bool))
        return jnp.sum(jnp.sin(jnp.einsum("bnqk,bknd->bqnd", w, v)))

    grads = jax.jit(lambda s: (jax.grad(fast)(s), jax.grad(dense)(s)))(0.3)
    np.testing.assert_allclose(*grads, rtol=1e-4)


@pytest.mark.parametrize("method", ["local", "strided", "bigbird"])
def test_bf16_is_finite_and_close_to_float64_reference(method):
    opts = {"local": {"window": 40}, "strided": {"window": 40, "stride": 16}}.get(method, BIGBIRD)
    q, k, v = make_qkv(1, 200, 200, 4, 2, 32, seed=4)
    q, k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k, v))
    pattern = ea.sparsity_pattern(method, 200, 200, causal=True, **opts)
    ref, _ = ea.numpy_reference(q, k, v, causal=True, mask=pattern)

    @jax.jit
    def out_and_grad(q, k, v):
        f = lambda q: ea.attention(q, k, v, method=method, causal=True, **opts)  # noqa: E731
        out, vjp = jax.vjp(f, q)
        return out, vjp(out)[0]

    out, dq = out_and_grad(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == dq.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(dq, np.float32)).all()
    assert rel_err(np.asarray(out, np.float32), ref) < 1e-2


def test_engine_visits_far_fewer_tiles_than_dense():
    t = 8192  # defaults, causal; dense attention computes all nq * nk tiles
    local = sparse.local_plan(t, t, causal=True, window=256)  # 3 tiles from the third on
    assert local.table.visited == 1 + 2 + 3 * (local.nq - 2) < local.nq * local.nk / 20
    strided = sparse.strided_plan(t, t, causal=True, window=256, stride=256)
    assert strided.table.visited <= local.table.visited + strided.nq  # + 1 summary tile
    bigbird = sparse.bigbird_plan(
        t, t, causal=True, block=64, num_global_blocks=2, num_random_blocks=3, seed=0
    )
    assert bigbird.table.visited <= (2 + 2 + 3) * bigbird.nq < bigbird.nq * bigbird.nk / 15


# ---- options ------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,options,match",
    [
        ("local", {"window": 0}, "window=0 must be an int >= 1"),
        ("local", {"window": 2.5}, "window=2.5"),
        ("local", {"window": True}, "window=True"),
        ("strided", {"stride": 0}, "stride=0"),
        ("bigbird", {"block": -8}, "block=-8"),
        ("bigbird", {"num_global_blocks": -1}, "num_global_blocks=-1 must be an int >= 0"),
        ("bigbird", {"num_random_blocks": "3"}, "num_random_blocks='3'"),
        ("bigbird", {"seed": -1}, "seed=-1"),
    ],
)
def test_invalid_options_raise(method, options, match):
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match=match):
        ea.attention(q, k, v, method=method, **options)
    with pytest.raises(ValueError, match=match):
        ea.sparsity_pattern(method, 13, 13, **options)


def test_render_pattern_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from efficient_attn.patterns import render_pattern

    path = render_pattern("bigbird", tmp_path / "bb.png", tq=32, **BIGBIRD)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2-D"):
        render_pattern(np.ones(3, bool), tmp_path / "bad.png")
