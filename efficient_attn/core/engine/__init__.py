"""The tile engine: FlashAttention-2 in pure JAX over a block mask, with mods and a pluggable score.

Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory"; Dao 2023,
"FlashAttention-2" (online softmax; a backward that recomputes tiles from the
saved log-sum-exp); Dong et al. 2024, "FlexAttention" (``mask_mod``,
``score_mod`` and block masks). Every exact tiled method runs here:
``blockwise``, the sparse methods (their patterns are mask mods), ``additive``
(its own :class:`Score`) and the ring kernels.

For each query tile the forward runs an online softmax over the key tiles
its :class:`~efficient_attn.core.blockmask.BlockMask` lists: first the partial
tiles, where the ``mask_mod`` is evaluated, then the full ones, which run
without any in-tile mask; empty tiles are never touched. The backward loops
over key tiles and, inside, over the query tiles that visit them (the
transposed lists), accumulating dK/dV per key tile and dQ in one O(N) buffer.
A block mask that differs per example or head runs both loops once per
``(b mod Bm, h mod Hm)`` over that group's own lists (``groups``), not over
their union.

A tile's logits are ``score_mod(scale * score(q_i, k_j), b, h, q_idx,
kv_idx)``; keys at positions ``>= kv_len[b]`` are invisible, and tiles whose
keys all lie there are skipped. The arrays a mod closes over are hoisted into
explicit arguments of the ``custom_vjp`` (:func:`efficient_attn.core.blockmask.hoist`),
so gradients reach learned score tables and slopes. Rows that see no key give
a zero output and a log-sum-exp of ``-inf`` (one convention for every caller).

Modules: ``score`` (:class:`Score`, :data:`DOT`), ``tiling`` (the ``[B, T, N,
H]`` <-> tile layouts, the static config and the per-tile masks, bias and
dropout), ``forward`` and ``backward`` (the two loops), ``groups`` (the loops
per group of a per-(b, h) block mask), ``tiled`` (the
``custom_vjp``, :func:`tiled_attention`, :func:`tiled_forward`,
:func:`tiled_backward`, :func:`result`), ``attend``
(:func:`plan_block_mask`, :func:`attend`) and ``ring`` (the ring kernels,
:func:`flash_ring_kernels`).
"""

from __future__ import annotations

from efficient_attn.core.engine.attend import attend as attend
from efficient_attn.core.engine.attend import plan_block_mask as plan_block_mask
from efficient_attn.core.engine.ring import RingMods as RingMods
from efficient_attn.core.engine.ring import flash_ring_kernels as flash_ring_kernels
from efficient_attn.core.engine.score import DOT as DOT
from efficient_attn.core.engine.score import DotScore as DotScore
from efficient_attn.core.engine.score import Score as Score
from efficient_attn.core.engine.tiled import result as result
from efficient_attn.core.engine.tiled import tiled_attention as tiled_attention
from efficient_attn.core.engine.tiled import tiled_backward as tiled_backward
from efficient_attn.core.engine.tiled import tiled_forward as tiled_forward
from efficient_attn.core.engine.tiling import _kv_blocks as _kv_blocks
