"""The forward of the tile engine: an online softmax over the listed tiles.

Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory"; Dao 2023,
"FlashAttention-2". For each query tile, the partial tiles of its block mask
(``mask_mod`` evaluated) then the full ones (no in-tile mask); empty tiles are
never touched, nor tiles whose keys all lie past ``kv_len``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_attn.core import masking
from efficient_attn.core.engine.score import rows_matmul
from efficient_attn.core.engine.tiling import (
    _head_index,
    _kv_rows,
    _kv_tile,
    _q_rows,
    _q_tile,
    _q_unblocks,
    _Static,
    _Tile,
    prescaled,
)


def _live(lst, count, k_first, max_len):
    """Entries of ``lst`` (ascending key tiles) before the first tile past ``max_len``."""
    if max_len is None:
        return count
    return jnp.sum((jnp.arange(lst.shape[0]) < count) & (k_first[lst] < max_len))


def _forward(st: _Static, q, k, v, scale, params, score_consts, kv_len, q_pos, k_pos, lists,
             mask_consts, bias, seed, offset=None):  # fmt: skip
    """Online softmax over the listed tiles: ``(out [B, Tq, N, Hv], lse [B, Tq, N])``
    (``offset``: the first example and head of a group, :mod:`.groups`)."""
    acc = masking.stat_dtype(q.dtype)
    b, _, n, _ = q.shape
    kh = k.shape[2]
    idx = _head_index(b, kh, n // kh, offset)
    q_s, folded = prescaled(st, q, scale)
    qr = _q_rows(q_s, kh, st.bq)  # tiles are sliced (and transposed) one at a time
    kr, vr = _kv_rows(k, st.bk), _kv_rows(v, st.bk)
    k_first = k_pos[:: st.bk]
    max_len = None if kv_len is None else jnp.max(kv_len)
    part_num, part_idx, full_num, full_idx = lists[:4]

    def q_tile(args):
        i, p_num, p_idx, f_num, f_idx = args
        q_i = _q_tile(qr, i, st.bq)  # [B, K, G, bq, H]
        stats_shape = q_i.shape[:-1]

        def run(partial, lst):
            def body(t, carry):
                o, m, l = carry
                j = lst[t]
                tile = _Tile(st, idx, q_pos, k_pos, i, j, kv_len, mask_consts, score_consts)
                s = st.score.logits(params, q_i, tile.values(_kv_tile(kr, j, st.bk)), acc)
                if not folded:
                    s = s * scale
                if bias is not None:
                    s = s + tile.bias(bias).astype(acc)
                if st.score_fn is not None:
                    s = tile.modded(s, score_consts)
                mask = tile.mask(partial)
                if mask is not None:
                    s = jnp.where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = rows_matmul("bkqs,bksd->bkqd", tile.dropout(seed)(p).astype(v.dtype),
                                 tile.values(_kv_tile(vr, j, st.bk)), acc)  # fmt: skip
                return o * alpha[..., None] + pv, m_new, l * alpha + p.sum(-1)

            return body

        carry = (
            jnp.zeros((*stats_shape, v.shape[-1]), acc),
            jnp.full(stats_shape, -jnp.inf, acc),
            jnp.zeros(stats_shape, acc),
        )
        carry = jax.lax.fori_loop(0, _live(p_idx, p_num, k_first, max_len), run(True, p_idx), carry)
        carry = jax.lax.fori_loop(
            0, _live(f_idx, f_num, k_first, max_len), run(False, f_idx), carry
        )
        o, m, l = carry
        nonempty = l > 0
        out = o / jnp.where(nonempty, l, 1.0)[..., None]
        lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)
        return out.astype(q.dtype), lse

    nq = qr.shape[1] // st.bq
    xs = (jnp.arange(nq), *(jnp.asarray(x) for x in (part_num, part_idx, full_num, full_idx)))
    out, lse = jax.lax.map(q_tile, xs)
    tq = q.shape[1]
    return _q_unblocks(out, tq), _q_unblocks(lse, tq)
