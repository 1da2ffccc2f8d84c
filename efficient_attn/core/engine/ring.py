"""Ring kernels on the tile engine: exact attention of a query shard over one key shard.

A ring kernel works on explicit token positions and returns the partial
output with its float32 log-sum-exp, so partial results over disjoint key
shards merge exactly (Milakov & Gimelshein 2018, online softmax). Its
backward takes the *global* output and log-sum-exp and returns this key
shard's contribution to the gradients (FlashAttention-2 backward, Dao 2023).

Positions are global 0-based indices, the ones the mods see: query ``p``
sees key ``r`` iff ``r < kv_len[b]`` and ``mask_mod(b, h, p, r)``; causal
attention is the mask ``efficient_attn.mods.causal_bottom_right``. A method
registers its kernel factory as ``ring=`` (``ring(**options) -> (forward,
backward)``); :class:`efficient_attn.parallel.kernels.RingKernel` resolves it.

    forward(q, k, v, q_pos, k_pos, kv_len, scale, *, mods, zigzag) -> (out, lse)
    backward(q, k, v, q_pos, k_pos, kv_len, scale, out, lse, dout, *, mods, zigzag)
        -> (dq, dk, dv, dscale, d_score_consts, score_consts)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from efficient_attn.core import blockmask as _bm
from efficient_attn.core.engine.tiled import tiled_backward, tiled_forward
from efficient_attn.core.engine.tiling import default_tiles
from efficient_attn.core.registry import positive_int


@dataclasses.dataclass(frozen=True, eq=False)
class RingMods:
    """The mods of one ring call: the mask (causal and the user's) and the score mod.

    ``q_limit``/``k_limit``: the global lengths; positions at or past them are padding.
    """

    mask_mod: Any
    score_mod: Any
    q_limit: int
    k_limit: int


def flash_ring_kernels(block_q: int | None = None, block_k: int | None = None,
                       implementation: str = "auto", interpret: bool = False,
                       kernel_config: Any = None):  # fmt: skip
    """Ring kernels on the tile engine: a block mask per (query shard, key shard) pair.

    They run the XLA engine (explicit positions per shard): ``implementation="auto"``
    (``blockwise``'s option) keeps them there; ``"pallas"`` is a ``ValueError``. Tiles:
    ``block_q x block_k`` (neither named: :func:`~.tiling.default_tiles`, the backward's own).
    """
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if value is not None:
            positive_int(name, value)
    if implementation == "pallas" or interpret or kernel_config is not None:
        raise ValueError(
            "strategy='ring' runs the XLA tile engine on each shard pair; the fused kernels "
            "(implementation='pallas', interpret, kernel_config) are not available there"
        )
    if implementation not in ("auto", "xla"):
        raise ValueError(f"implementation={implementation!r}; valid: 'auto', 'xla', 'pallas'")

    def setup(q, k, q_pos, k_pos, mods: RingMods, zigzag, backward=False):
        # Tiles no longer than a zigzag chunk, so causal tile skipping stays effective.
        tq, tk = q.shape[1], k.shape[1]
        lq, lk = (tq // 2, tk // 2) if zigzag else (tq, tk)
        tiles = default_tiles(tq, tk, backward and block_q is None and block_k is None)
        bq = min(tiles[0] if block_q is None else block_q, max(lq, 1))
        bk = min(tiles[1] if block_k is None else block_k, max(lk, 1))
        bm = _bm.build(
            mods.mask_mod, q_pos, k_pos, q_limit=mods.q_limit, k_limit=mods.k_limit,
            batch=q.shape[0], heads=q.shape[2], block_q=bq, block_k=bk, infer=True,
        )  # fmt: skip
        return {"block_mask": bm, "score_mod": mods.score_mod, "q_pos": q_pos, "k_pos": k_pos,
                "q_limit": mods.q_limit, "k_limit": mods.k_limit}  # fmt: skip

    def forward(q, k, v, q_pos, k_pos, kv_len, scale, *, mods, zigzag=False):
        kw = setup(q, k, q_pos, k_pos, mods, zigzag)
        return tiled_forward(q, k, v, scale=scale, kv_len=kv_len, **kw)

    def backward(q, k, v, q_pos, k_pos, kv_len, scale, out, lse, dout, *, mods, zigzag=False):
        kw = setup(q, k, q_pos, k_pos, mods, zigzag, backward=True)
        return tiled_backward(q, k, v, out, lse, dout, scale=scale, kv_len=kv_len, **kw)

    return forward, backward
