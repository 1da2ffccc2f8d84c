"""Flax layers and small models that run any registered attention method."""

from efficient_attn.nn.attention import MultiHeadAttention
from efficient_attn.nn.model import DecoderLM, ModelConfig

__all__ = ["DecoderLM", "ModelConfig", "MultiHeadAttention"]
