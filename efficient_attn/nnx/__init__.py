"""Flax NNX layers and small models that run any registered attention method.

The NNX twins of :mod:`efficient_attn.nn` (same configs, same parameter names),
plus packed-sequence training: ``segment_ids=`` in every layer and model.
"""

from efficient_attn.nn.model import ModelConfig
from efficient_attn.nnx.attention import MultiHeadAttention, segment_mask
from efficient_attn.nnx.convert import load_linen
from efficient_attn.nnx.model import Block, Classifier, DecoderLM, TokenShift, segment_positions
from efficient_attn.nnx.seq2seq import EncoderDecoder, greedy_decode

__all__ = [
    "Block",
    "Classifier",
    "DecoderLM",
    "EncoderDecoder",
    "ModelConfig",
    "MultiHeadAttention",
    "TokenShift",
    "greedy_decode",
    "load_linen",
    "segment_mask",
    "segment_positions",
]
