"""Sparse family (local, strided, bigbird): patterns defined by mask mods, on the tile engine.

The conformance suite checks every method against dense softmax restricted to
its pattern at default options; here: the patterns themselves, their block
masks, many small tiles (lengths that are not tile multiples), gradients,
bf16, option errors and the amount of skipped work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.core import masking
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


# ---- execution: block masks of the patterns, outputs and gradients against float64 -----


def _masks(tq, tk, causal):
    yield "local", {"window": 20}
    yield "strided", {"window": 9, "stride": 7}
    yield "bigbird", BIGBIRD


@pytest.mark.parametrize("tq,tk", [(77, 77), (45, 130), (200, 333)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_pattern_is_the_mask_mod_and_its_block_mask_covers_it(tq, tk, causal):
    for name, opts in _masks(tq, tk, causal):
        mod = sparse.method_mask(name, tq, tk, causal=causal, **opts)
        pattern = ea.sparsity_pattern(name, tq, tk, causal=causal, **opts)
        bm = ea.block_mask(mod, tq, tk, block_q=16, block_k=16)
        np.testing.assert_array_equal(bm.dense()[0, 0], pattern, err_msg=name)
        tiles = np.repeat(np.repeat(bm.tiles[0, 0], 16, 0), 16, 1)[:tq, :tk]
        assert not (pattern & (tiles == 0)).any(), name  # no visible pair in an empty tile
        assert pattern[tiles == 2].all(), name  # full tiles are full


CASES = [  # (method, Tq, Tk, N, K, causal, kv_lengths)
    pytest.param("local", 150, 150, 4, 2, True, (90, 37), id="local-T150-gqa-causal-pad"),
    pytest.param("local", 70, 150, 2, 1, False, None, id="local-Tq70-Tk150-mqa"),
    pytest.param("strided", 150, 150, 4, 4, True, (100, 60), id="strided-T150-causal-pad"),
    pytest.param("strided", 95, 61, 4, 2, False, (61, 20), id="strided-Tq95-Tk61-gqa-pad"),
    pytest.param("bigbird", 150, 150, 4, 2, False, (83, 50), id="bigbird-T150-gqa-pad"),
    pytest.param("bigbird", 61, 150, 2, 1, True, None, id="bigbird-Tq61-Tk150-mqa-causal"),
]


@pytest.mark.parametrize("method,tq,tk,n,kh,causal,kv_lengths", CASES)
def test_many_tiles_match_float64_reference_with_gradients(
    method, tq, tk, n, kh, causal, kv_lengths, monkeypatch
):
    monkeypatch.setattr(sparse, "TILE", 16)  # many tiles, lengths that are not tile multiples
    opts = dict(dict(_masks(tq, tk, causal))[method])
    pattern = ea.sparsity_pattern(method, tq, tk, causal=causal, **opts)
    q, k, v = make_qkv(2, tq, tk, n, kh, 16, seed=1)
    dout = np.random.default_rng(2).standard_normal((2, tq, n, 16)).astype(np.float32)
    lengths = None if kv_lengths is None else np.array(kv_lengths)
    kw = {"causal": causal, "kv_lengths": lengths, "scale": 0.25}

    @jax.jit
    def f(q, k, v, dout):
        out, vjp = jax.vjp(lambda *x: ea.attention(*x, method=method, **kw, **opts), q, k, v)
        return (out, *vjp(dout))

    got = f(q, k, v, dout)
    kw["mask"] = pattern
    refs = (ea.numpy_reference(q, k, v, **kw)[0], *ea.numpy_reference_grads(q, k, v, dout, **kw))
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, refs, strict=True):
        assert rel_err(x, ref) < 2e-5, (name, rel_err(x, ref))


def test_scale_gradient_matches_dense_restricted_to_pattern():
    tq = tk = 70
    opts = {"window": 9, "stride": 7}
    mask = jnp.asarray(ea.sparsity_pattern("strided", tq, tk, causal=True, **opts))
    q, k, v = (jnp.asarray(x) for x in make_qkv(1, tq, tk, 2, 2, 8))

    def fast(scale):
        out = ea.attention(q, k, v, method="strided", causal=True, scale=scale, **opts)
        return jnp.sum(jnp.sin(out))

    def dense(scale):
        s = jnp.einsum("bqnh,bknh->bnqk", q, k) * scale
        w = masking.safe_softmax(s, mask)
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
    local = ea.block_mask(sparse.local_mask(t, t, causal=True, window=256), t, t)
    nq = t // 128
    assert (local.tiles != 0).sum() == 1 + 2 + 3 * (nq - 2) < nq * nq / 20
    bigbird = ea.block_mask(
        sparse.bigbird_mask(t, t, causal=True, block=64, num_global_blocks=2,
                            num_random_blocks=3, seed=0), t, t, block_q=64, block_k=64,
    )  # fmt: skip
    nb = t // 64
    assert (bigbird.tiles != 0).sum() <= (2 + 2 + 3) * nb < nb * nb / 15


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
    from efficient_attn.core.patterns import render_pattern

    path = render_pattern("bigbird", tmp_path / "bb.png", tq=32, **BIGBIRD)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2-D"):
        render_pattern(np.ones(3, bool), tmp_path / "bad.png")
