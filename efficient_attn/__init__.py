"""efficient_attn: every family of efficient attention behind one API, measured side by side.

>>> import efficient_attn as ea
>>> out = ea.attention(q, k, v, method="blockwise", causal=True)  # doctest: +SKIP
"""

from efficient_attn import methods as _methods  # noqa: F401  (registers the families)
from efficient_attn.core import mods
from efficient_attn.core.api import attention, attention_weights, sparsity_pattern
from efficient_attn.core.blockmask import BlockMask, block_mask
from efficient_attn.core.merge import merge_attention
from efficient_attn.core.recurrent import init_state as linear_init_state
from efficient_attn.core.recurrent import recurrent_methods
from efficient_attn.core.recurrent import step as linear_step
from efficient_attn.core.reference import numpy_reference, numpy_reference_grads
from efficient_attn.core.registry import (
    BASIC_FEATURES,
    FAMILIES,
    FEATURES,
    MOD_FEATURES,
    ArrayOption,
    Method,
    Native,
    Recurrent,
    TokenProjection,
    get_method,
    init_arrays,
    methods,
    register_method,
)
from efficient_attn.dropin import dot_product_attention
from efficient_attn.methods.linear import LinearState
from efficient_attn.parallel import sequence_parallel_attention

__all__ = [
    "BASIC_FEATURES",
    "FAMILIES",
    "FEATURES",
    "MOD_FEATURES",
    "ArrayOption",
    "BlockMask",
    "LinearState",
    "Method",
    "Native",
    "Recurrent",
    "TokenProjection",
    "attention",
    "attention_weights",
    "block_mask",
    "dot_product_attention",
    "get_method",
    "init_arrays",
    "linear_init_state",
    "linear_step",
    "merge_attention",
    "methods",
    "mods",
    "numpy_reference",
    "numpy_reference_grads",
    "recurrent_methods",
    "register_method",
    "sequence_parallel_attention",
    "sparsity_pattern",
]
__version__ = "0.1.0"
