"""Fused Pallas kernels of the tile engine: Triton on NVIDIA GPUs, Mosaic on TPUs.

:func:`fused_attention` has the contract of
:func:`efficient_attn.core.engine.tiled_attention` (dot-product score); ``blockwise``
and ``local`` run :func:`attend`, which selects it or the XLA engine with
``implementation=`` (see :mod:`efficient_attn.kernels.dispatch`); :func:`fallbacks`
says why ``"auto"`` ran a call on the XLA engine.
"""

from efficient_attn.kernels.common import Unsupported
from efficient_attn.kernels.config import GPU_HOPPER, TPU_V5E, TPU_V6E, TileConfig, default_config
from efficient_attn.kernels.dispatch import IMPLEMENTATIONS, attend, fallbacks, kernel_branches
from efficient_attn.kernels.fused import fused_attention

__all__ = [
    "GPU_HOPPER",
    "IMPLEMENTATIONS",
    "TPU_V5E",
    "TPU_V6E",
    "TileConfig",
    "Unsupported",
    "attend",
    "default_config",
    "fallbacks",
    "fused_attention",
    "kernel_branches",
]
