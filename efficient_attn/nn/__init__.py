"""Flax layers and small models that run any registered attention method."""

from efficient_attn.nn.attention import MultiHeadAttention
from efficient_attn.nn.dropin import attention_fn
from efficient_attn.nn.model import Classifier, DecoderLM, ModelConfig
from efficient_attn.nn.seq2seq import EncoderDecoder, greedy_decode

__all__ = [
    "Classifier",
    "DecoderLM",
    "EncoderDecoder",
    "ModelConfig",
    "MultiHeadAttention",
    "attention_fn",
    "greedy_decode",
]
