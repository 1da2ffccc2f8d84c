"""Blockwise (flash-style) attention: tiling edge cases, tile skipping, O(N) memory, properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attn as ea
from efficient_attn import bench
from tests.conftest import make_qkv, rel_err


def _grads(method, q, k, v, dout, **kw):
    out, vjp = jax.vjp(lambda q, k, v: ea.attention(q, k, v, method=method, **kw), q, k, v)
    return (out, *vjp(dout))


@pytest.mark.parametrize(
    "tq,tk,bq,bk",
    [
        (29, 29, 7, 5),
        pytest.param(29, 29, 8, 8, marks=pytest.mark.slow),
        (16, 40, 5, 9),
        pytest.param(40, 11, 6, 4, marks=pytest.mark.slow),
        (1, 33, 4, 8),
        (33, 1, 8, 4),
    ],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_many_small_tiles_match_float64(tq, tk, bq, bk, causal):
    """Lengths that are not multiples of the tiles, every causal offset sign, decode (Tq=1)."""
    q, k, v = make_qkv(2, tq, tk, 4, 2, 8, seed=tq * 100 + tk)
    lengths = np.array([tk, max(tk // 2, 1)])
    dout = np.random.default_rng(0).standard_normal((2, tq, 4, 8)).astype(np.float32)
    kw = {"causal": causal, "kv_lengths": lengths}
    got = _grads("blockwise", q, k, v, dout, block_q=bq, block_k=bk, **kw)
    ref_out, _ = ea.numpy_reference(q, k, v, **kw)
    refs = (ref_out, *ea.numpy_reference_grads(q, k, v, dout, **kw))
    assert rel_err(got[0], refs[0]) < 2e-5
    for x, ref in zip(got, refs, strict=True):  # absolute floor: dq is ~0 when Tk == 1
        np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-4, atol=1e-5)


def test_block_size_does_not_change_result():
    q, k, v = make_qkv(1, 50, 50, 2, 2, 16)
    outs = [
        np.asarray(ea.attention(q, k, v, method="blockwise", causal=True, block_q=a, block_k=b))
        for a, b in [(50, 50), (16, 8), (7, 13), (1, 1)]
    ]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-6)


def test_causal_tiles_above_diagonal_are_not_visited():
    """NaN values in key tiles the first query tile cannot see never reach it (0*NaN = NaN
    would show a visited-then-masked tile), in the forward pass and in dq."""
    q, k, v = make_qkv(1, 64, 64, 2, 2, 8)
    v = v.copy()
    v[:, 16:] = np.nan  # key tiles 1..3 with block_k=16; query tile 0 (rows 0..15) sees tile 0
    kw = {"method": "blockwise", "causal": True, "block_q": 16, "block_k": 16}
    out = np.asarray(ea.attention(q, k, v, **kw))
    assert np.isfinite(out[:, :16]).all()
    assert np.isnan(out[:, 16:]).all()
    dq = jax.grad(lambda q: jnp.sum(ea.attention(q, k, v, **kw)[:, :16]))(q)
    assert np.isfinite(np.asarray(dq)[:, :16]).all()


def test_tiles_past_the_longest_kv_length_are_not_visited():
    q, k, v = make_qkv(2, 20, 64, 2, 2, 8)
    k, v = k.copy(), v.copy()
    k[:, 32:], v[:, 32:] = np.nan, np.nan
    lengths = np.array([32, 20])
    out = ea.attention(q, k, v, method="blockwise", kv_lengths=lengths, block_k=16)
    ref, _ = ea.numpy_reference(q[:, :, :, :], k[:, :32], v[:, :32], kv_lengths=lengths)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-6)


def test_causal_block_mask_visits_the_lower_triangle():
    bm = ea.block_mask(ea.mods.causal_mask(), 1024, 1024, block_q=128, block_k=128)
    tiles = bm.tiles[0, 0]
    assert (tiles != 0).sum() == 8 * 9 // 2  # empty tiles above the diagonal
    assert (tiles == 1).sum() == 8 and (np.diag(tiles) == 1).all()  # only the diagonal is masked
    assert bm.kv_num[0, 0].tolist() == [1] * 8 and bm.full_kv_num[0, 0].tolist() == list(range(8))
    assert bm.q_num[0, 0].tolist() == [1] * 8 and bm.full_q_num[0, 0].tolist() == list(
        range(7, -1, -1)
    )


def test_tiled_forward_with_positions_composes_over_key_shards():
    """Two key shards merged by their log-sum-exp equal the full attention (ring building block)."""
    from efficient_attn.core import blockmask
    from efficient_attn.core.engine import tiled_forward

    q, k, v = make_qkv(1, 24, 24, 2, 2, 8)
    pos = np.arange(24, dtype=np.int32)
    causal = ea.mods.causal_mask()
    kv_len = jnp.array([24])
    parts = []
    for keys in (slice(0, 10), slice(10, 24)):
        bm = blockmask.build(causal, pos, pos[keys], q_limit=24, k_limit=24, batch=None,
                             heads=None, block_q=8, block_k=8)  # fmt: skip
        parts.append(tiled_forward(q, k[:, keys], v[:, keys], scale=0.3, block_mask=bm,
                                   kv_len=kv_len, k_pos=pos[keys], k_limit=24))  # fmt: skip
    assert np.isneginf(np.asarray(parts[1][1])[:, :10]).all()  # rows 0..9 see no key of shard 2
    out, _ = ea.merge_attention(*zip(*parts, strict=True))
    ref, _ = ea.numpy_reference(q, k, v, causal=True, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-6)


def test_compiled_memory_is_linear_in_length():
    """Compiled (not timed) temporary memory of fwd+bwd: blockwise O(N), dense O(N^2)."""

    def temp(method, t):
        args = bench.random_inputs(1, t, t, 2, 2, 32)
        f = bench.attention_fn(method, causal=True, backward=True)
        return bench.temp_bytes(bench.compiled(f, *args)[0])

    b1, b2 = temp("blockwise", 2048), temp("blockwise", 4096)
    d2 = temp("dense", 4096)
    assert b2 / b1 < 2.5
    assert b2 < 0.1 * d2


@settings(max_examples=3)
@given(
    b=st.integers(1, 2),
    tq=st.integers(1, 40),
    tk=st.integers(1, 40),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3]),
    h=st.sampled_from([4, 8]),
    hv=st.sampled_from([4, 6]),
    bq=st.integers(1, 16),
    bk=st.integers(1, 16),
    causal=st.booleans(),
    use_lengths=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_blockwise_and_dense_match_float64(
    b, tq, tk, kv_heads, group, h, hv, bq, bk, causal, use_lengths, seed
):
    rng = np.random.default_rng(seed)
    n = kv_heads * group
    q = rng.standard_normal((b, tq, n, h)).astype(np.float32)
    k = rng.standard_normal((b, tk, kv_heads, h)).astype(np.float32)
    v = rng.standard_normal((b, tk, kv_heads, hv)).astype(np.float32)
    lengths = rng.integers(0, tk + 1, size=b) if use_lengths else None
    ref, _ = ea.numpy_reference(q, k, v, causal=causal, kv_lengths=lengths)
    for method, opts in (("dense", {}), ("blockwise", {"block_q": bq, "block_k": bk})):
        out = np.asarray(
            ea.attention(q, k, v, method=method, causal=causal, kv_lengths=lengths, **opts)
        )
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


@settings(max_examples=3)
@given(
    tq=st.integers(1, 24),
    tk=st.integers(1, 24),
    group=st.sampled_from([1, 2]),
    bq=st.integers(2, 9),
    bk=st.integers(2, 9),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_blockwise_gradients_match_float64(tq, tk, group, bq, bk, causal, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, tq, 2 * group, 8)).astype(np.float32)
    k = rng.standard_normal((1, tk, 2, 8)).astype(np.float32)
    v = rng.standard_normal((1, tk, 2, 8)).astype(np.float32)
    dout = rng.standard_normal((1, tq, 2 * group, 8)).astype(np.float32)
    got = _grads("blockwise", q, k, v, dout, causal=causal, block_q=bq, block_k=bk)[1:]
    refs = ea.numpy_reference_grads(q, k, v, dout, causal=causal)
    for x, ref in zip(got, refs, strict=True):
        np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize(
    "case", ["causal", "window+alibi", "documents+closure", "bias+dropout"], ids=str
)
def test_backward_on_its_own_tiles_matches_one_tiling(case):
    """The backward on other tiles than the forward (the engine's CPU default: 512x256
    forward, 256x512 backward) gives the gradients of one tiling, for every array input:
    q, k, v, a score_mod's slopes, a closure's table, a dense bias, with dropout and
    ragged kv lengths at lengths that are no multiple of either tiling."""
    from efficient_attn.core import engine, masking
    from efficient_attn.core.mods import alibi, alibi_slopes, causal_mask, sliding_window

    t = 37
    q, k, v = make_qkv(2, t, t, 4, 2, 8, seed=7)
    rng = np.random.default_rng(1)
    dout = jnp.asarray(rng.standard_normal((2, t, 4, 8)), jnp.float32)
    slopes = jnp.asarray(alibi_slopes(4))
    table = jnp.asarray(rng.standard_normal((4, 2 * t)), jnp.float32) * 0.3
    bias = jnp.asarray(rng.standard_normal((1, 4, t, t)), jnp.float32)
    seg = jnp.asarray(np.repeat(np.arange(3), [10, 15, 12])[None].repeat(2, 0))
    kv_lengths = jnp.array([t, 30])

    def call(q, k, v, slopes, table, bias, tiles):
        kw = {"causal": case != "documents+closure", "kv_lengths": kv_lengths, "scale": 0.3}
        if case == "window+alibi":
            kw |= {"mask_mod": sliding_window(9) & causal_mask(), "score_mod": alibi(slopes)}
        if case == "documents+closure":
            kw["mask_mod"] = lambda b, h, i, j: seg[b, i] == seg[b, j]
            kw["score_mod"] = lambda s, b, h, i, j: s + table[h, i - j + t]
        if case == "bias+dropout":
            kw |= {"bias": bias, "dropout": masking.Dropout(0.3, jnp.array([3, 4], jnp.uint32))}
        out, lse = engine.attend(q, k, v, block_q=8, block_k=4, bwd_tiles=tiles, **kw)
        return out, lse

    args = (q, k, v, slopes, table, bias)
    results = []
    for tiles in (None, (4, 16)):
        (out, lse), vjp = jax.vjp(lambda *a, tiles=tiles: call(*a, tiles), *args)
        results.append((out, lse, *vjp((dout, jnp.ones_like(lse) * 0.1))))
    for name, one, two in zip(("out", "lse", "dq", "dk", "dv", "dslopes", "dtable", "dbias"),
                              *results, strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(two), np.asarray(one), rtol=2e-5, atol=2e-6,
                                   err_msg=name)  # fmt: skip
    assert float(jnp.abs(results[0][2]).sum()) > 0  # the gradients are not trivially zero
