"""Tile configurations of the fused kernels, one frozen record per backend and chip.

Defaults follow the public kernels they are modelled on (FlashAttention-2's Triton
tiles, Dao 2023; JAX's Pallas ops; splash attention's 512-wide TPU tiles). They have
not been tuned on hardware here: override them with the methods' ``kernel_config=``
(see :func:`default_config`).
"""

from __future__ import annotations

import dataclasses


def _pow2(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a positive power of two")
    return value


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiles and launch parameters of the fused kernels for one backend.

    Attributes:
      block_q, block_k: query and key tile sizes of the forward (the block mask is
        built at these tiles; powers of two).
      bwd_block_q, bwd_block_k: tiles of the dK/dV and dQ kernels (a second block mask;
        None: the forward's). Smaller tiles keep the backward's five tile-sized
        temporaries in registers.
      num_warps, num_stages: Triton launch parameters (GPU only); ``num_warps=None``
        picks 4 for head_dim <= 64, else 8.
      vmem_limit_bytes: Mosaic's scoped VMEM limit (TPU only; None: Mosaic's default).
    """

    block_q: int = 128
    block_k: int = 64
    bwd_block_q: int | None = None
    bwd_block_k: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        _pow2("block_q", self.block_q)
        _pow2("block_k", self.block_k)
        for name in ("bwd_block_q", "bwd_block_k"):
            if getattr(self, name) is not None:
                _pow2(name, getattr(self, name))
        if self.num_warps is not None:
            _pow2("num_warps", self.num_warps)
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages!r} must be a positive int")

    @property
    def backward_tiles(self) -> tuple[int, int]:
        """``(bq, bk)`` of the backward kernels."""
        return self.bwd_block_q or self.block_q, self.bwd_block_k or self.block_k

    def warps(self, head_dim: int) -> int:
        """Triton warps for a (padded) head_dim."""
        return self.num_warps or (4 if head_dim <= 64 else 8)


#: NVIDIA Hopper (H100, H200) through Pallas' Triton backend.
GPU_HOPPER = TileConfig(block_q=128, block_k=64, bwd_block_q=64, bwd_block_k=64, num_stages=2)
#: TPU v5e (Mosaic): 512-wide tiles as splash attention uses.
TPU_V5E = TileConfig(block_q=512, block_k=512, vmem_limit_bytes=64 * 2**20)
#: TPU v6e (Mosaic): wider key tiles for its larger MXU.
TPU_V6E = TileConfig(block_q=512, block_k=1024, vmem_limit_bytes=64 * 2**20)

_DEFAULTS = {"gpu": GPU_HOPPER, "tpu": TPU_V5E}
_BY_CHIP = {"h100": GPU_HOPPER, "h200": GPU_HOPPER, "v5e": TPU_V5E, "v5 lite": TPU_V5E,
            "v6e": TPU_V6E, "v6 lite": TPU_V6E}  # fmt: skip


def default_config(backend: str, device_kind: str | None = None) -> TileConfig:
    """The default :class:`TileConfig` of ``backend`` (``"gpu"`` or ``"tpu"``).

    ``device_kind`` (``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H200"``,
    ``"TPU v6 lite"``) picks a chip's own tiles where one is listed.
    """
    if backend not in _DEFAULTS:
        raise ValueError(f"backend={backend!r}; valid backends: {', '.join(_DEFAULTS)}")
    kind = (device_kind or "").lower()
    for chip, cfg in _BY_CHIP.items():
        if chip in kind:
            return cfg
    return _DEFAULTS[backend]
