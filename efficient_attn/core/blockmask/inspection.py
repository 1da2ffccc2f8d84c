"""Inspecting block masks: PNG rendering of the tile classes beside the dense mask (``matplotlib``).

:func:`save_figure` is shared with :mod:`efficient_attn.core.patterns` (method
sparsity patterns); ``matplotlib`` is imported only when rendering.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np


def save_figure(fig, path: str | pathlib.Path, title: str | None, dpi: int) -> pathlib.Path:
    """Give ``fig`` its title, write it to ``path`` (making the folder) and close it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def render_block_mask(block_mask: Any, path: str | pathlib.Path, *, b: int = 0, h: int = 0,
                      title: str | None = None, dpi: int = 100) -> pathlib.Path:  # fmt: skip
    """Write a PNG of a :class:`~efficient_attn.BlockMask`: its tile classes beside the mask.

    Left: tiles (white empty, grey partial, black full); right: the dense
    ``[q_len, kv_len]`` mask of batch element ``b`` and head ``h``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = np.asarray(block_mask.tiles)[min(b, block_mask.tiles.shape[0] - 1),
                                         min(h, block_mask.tiles.shape[1] - 1)]  # fmt: skip
    dense = block_mask.dense()
    dense = dense[min(b, dense.shape[0] - 1), min(h, dense.shape[1] - 1)]
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
    axes[0].imshow(tiles, cmap="Greys", vmin=0, vmax=2, interpolation="nearest")
    axes[0].set_title(
        f"tiles {block_mask.block_q}x{block_mask.block_k}: {np.mean(tiles != 0):.0%} visited, "
        f"{np.mean(tiles == 2):.0%} full",
        fontsize=9,
    )
    axes[1].imshow(dense, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    axes[1].set_title(f"mask: {dense.mean():.0%} of pairs", fontsize=9)
    for ax, (y, x) in zip(axes, (("query tile", "key tile"), ("query", "key")), strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
    return save_figure(fig, path, title, dpi)
