"""Blockwise (flash-style) exact attention in pure JAX, O(N) memory forward and backward.

Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory"; Dao 2023,
"FlashAttention-2". The tile engine (online softmax over a block mask, custom
backward) lives in :mod:`efficient_attn.core.engine`; this method runs it with the
dot-product score, any ``mask_mod``/``score_mod`` and a reusable ``block_mask``.
"""

from __future__ import annotations

from typing import Any

import jax

from efficient_attn import kernels
from efficient_attn.core import engine
from efficient_attn.core.engine.ring import flash_ring_kernels
from efficient_attn.core.engine.tiling import default_tiles
from efficient_attn.core.registry import FEATURES, positive_int, register_method


@register_method("blockwise", exact=True, family="full", supports=FEATURES, ring=flash_ring_kernels)
def blockwise(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths: jax.Array | None,
    scale: float,
    mask_mod: Any = None,
    score_mod: Any = None,
    block_mask: Any = None,
    bias: jax.Array | None = None,
    dropout: Any = None,
    return_lse: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
    implementation: str = "auto",
    interpret: bool = False,
    kernel_config: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Memory-efficient exact attention (Rabe & Staats 2021; FlashAttention-2 online softmax).

    q: [B, Tq, N, H], k: [B, Tk, K, H], v: [B, Tk, K, Hv] -> [B, Tq, N, Hv].
    Any lengths (tiles are padded and masked internally); tiles of
    ``block_q`` queries and ``block_k`` keys for both passes (clipped to the
    sequence length), or those of ``block_mask``; with neither tile named, the
    engine's measured defaults (:func:`~efficient_attn.core.engine.tiling.default_tiles`:
    512x256 forward, 256x512 backward). Empty tiles (above the causal diagonal, outside
    a ``mask_mod``, past every ``kv_lengths``) are skipped. ``bias``
    (broadcastable to ``[B, N, Tq, Tk]``) is read one tile at a time, and
    ``dropout`` regenerates its mask per tile in the backward (both on the
    XLA engine: the fused kernels have neither yet).

    ``implementation``: ``"auto"`` (fused Pallas kernels on GPU and TPU, this
    XLA engine elsewhere), ``"xla"`` or ``"pallas"``; ``interpret=True`` runs
    the kernels on a CPU (see :mod:`efficient_attn.kernels`). The kernels use
    their own tiles, ``kernel_config`` (a :class:`efficient_attn.kernels.TileConfig`;
    None: the backend's default), not ``block_q``/``block_k``.
    """
    tq, tk = q.shape[1], k.shape[1]
    bwd = default_tiles(tq, tk, backward=True) if block_q is None and block_k is None else None
    tiles = default_tiles(tq, tk)
    block_q = tiles[0] if block_q is None else positive_int("block_q", block_q)
    block_k = tiles[1] if block_k is None else positive_int("block_k", block_k)
    out_lse = kernels.attend(
        q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale, block_q=block_q,
        block_k=block_k, mask_mod=mask_mod, score_mod=score_mod, block_mask=block_mask,
        bias=bias, dropout=dropout, implementation=implementation, interpret=interpret,
        kernel_config=kernel_config, bwd_tiles=bwd,
    )  # fmt: skip
    return engine.result(out_lse, return_lse, q.dtype)
