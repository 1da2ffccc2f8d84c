"""Sequence parallelism over a JAX mesh: ring and all-to-all attention, multi-process start-up."""

from efficient_attn.parallel.api import STRATEGIES, sequence_parallel_attention
from efficient_attn.parallel.distributed import initialize
from efficient_attn.parallel.kernels import ring_methods

__all__ = ["STRATEGIES", "initialize", "ring_methods", "sequence_parallel_attention"]
