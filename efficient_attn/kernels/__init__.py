"""Fused Pallas kernels of the tile engine: Triton on NVIDIA GPUs, Mosaic on TPUs.

:func:`fused_attention` has the contract of
:func:`efficient_attn.flash.tiled_attention` (dot-product score); the engine's
methods select it with ``implementation=`` (see :mod:`efficient_attn.flash`).
"""

from efficient_attn.kernels.common import Unsupported
from efficient_attn.kernels.config import GPU_HOPPER, TPU_V5E, TPU_V6E, TileConfig, default_config
from efficient_attn.kernels.fused import fused_attention

__all__ = [
    "GPU_HOPPER",
    "TPU_V5E",
    "TPU_V6E",
    "TileConfig",
    "Unsupported",
    "default_config",
    "fused_attention",
]
