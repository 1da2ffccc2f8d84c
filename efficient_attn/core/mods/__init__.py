"""A library of ``mask_mod`` and ``score_mod`` functions (FlexAttention's programming model).

Dong et al. 2024, "FlexAttention: A Programming Model for Generating Optimized
Attention Kernels". A variant of attention is two small functions:

* ``mask_mod(b, h, q_idx, kv_idx) -> bool``: whether query ``q_idx`` of batch
  element ``b`` and query head ``h`` sees key ``kv_idx``;
* ``score_mod(score, b, h, q_idx, kv_idx) -> score``: a new logit from the
  scaled logit ``scale * q . k``.

Indices are absolute 0-based positions passed as broadcastable int32 arrays,
so mods are ordinary ``jnp`` expressions and may index arrays they close over
(segment ids, a bias table, per-head slopes); gradients reach those arrays.

Masks here are written with operators, so they evaluate on NumPy index
arrays too (static block masks are built without compiling anything). Every
mod here is a small frozen dataclass registered as a pytree: its
settings are static (hashable, so masks over indices only are built once and
cached) and its arrays are leaves (a :class:`efficient_attn.BlockMask` holding
a document mask can be passed into and returned from ``jax.jit``). Combine
masks with :func:`and_masks` / :func:`or_masks` (or ``&`` / ``|``) and scores
with :func:`chain_scores`. Plain functions and lambdas work everywhere too.

The modules: ``base`` (:class:`Mask`, :class:`Score`, the combinators),
``masks`` (causal, windows, chunks, prefix-LM, boolean, documents),
``bigbird`` (BigBird's block pattern), ``scores`` (ALiBi, soft-cap, relative
bias) and ``variants`` (named variants for sweeps: :func:`from_spec`).
"""

from efficient_attn.core.mods.base import (
    Mask,
    MaskMod,
    Score,
    ScoreMod,
    and_masks,
    chain_scores,
    invert_mask,
    or_masks,
)
from efficient_attn.core.mods.bigbird import BigBird, bigbird_blocks, bigbird_mask
from efficient_attn.core.mods.masks import (
    BoolMask,
    Causal,
    Chunked,
    DilatedWindow,
    Documents,
    Full,
    PrefixLM,
    PrefixLMPerExample,
    SlidingWindow,
    StridedSummary,
    bool_mask,
    causal_bottom_right,
    causal_mask,
    chunked_mask,
    dilated_window,
    document_mask,
    full_mask,
    prefix_lm,
    sliding_window,
    strided_summary,
)
from efficient_attn.core.mods.scores import (
    ALiBi,
    RelativeBias,
    SoftCap,
    alibi,
    alibi_slopes,
    relative_position_bias,
    soft_cap,
)
from efficient_attn.core.mods.variants import VARIANTS, from_spec

__all__ = [
    "VARIANTS",
    "ALiBi",
    "BigBird",
    "BoolMask",
    "Causal",
    "Chunked",
    "DilatedWindow",
    "Documents",
    "Full",
    "Mask",
    "MaskMod",
    "PrefixLM",
    "PrefixLMPerExample",
    "RelativeBias",
    "Score",
    "ScoreMod",
    "SlidingWindow",
    "SoftCap",
    "StridedSummary",
    "alibi",
    "alibi_slopes",
    "and_masks",
    "bigbird_blocks",
    "bigbird_mask",
    "bool_mask",
    "causal_bottom_right",
    "causal_mask",
    "chain_scores",
    "chunked_mask",
    "dilated_window",
    "document_mask",
    "from_spec",
    "full_mask",
    "invert_mask",
    "or_masks",
    "prefix_lm",
    "relative_position_bias",
    "sliding_window",
    "soft_cap",
    "strided_summary",
]
