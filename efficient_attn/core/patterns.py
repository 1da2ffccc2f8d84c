"""Render sparsity patterns and block masks as images, for docs and papers (needs ``matplotlib``).

``python -m efficient_attn.core.patterns docs/patterns`` regenerates the images in
``docs/patterns/``.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from efficient_attn.core.api import sparsity_pattern

#: (method, length, options) of the images in docs/patterns/: small options so
#: the structure is visible at a glance.
DOC_PATTERNS: tuple[tuple[str, int, dict[str, int]], ...] = (
    ("local", 128, {"window": 16}),
    ("strided", 128, {"window": 16, "stride": 16}),
    ("bigbird", 128, {"block": 8, "num_global_blocks": 2, "num_random_blocks": 2, "seed": 0}),
)


def render_pattern(
    pattern_or_method: np.ndarray | str,
    path: str | pathlib.Path,
    *,
    tq: int = 128,
    tk: int | None = None,
    causal: bool | Sequence[bool] = (False, True),
    title: str | None = None,
    dpi: int = 100,
    **options: Any,
) -> pathlib.Path:
    """Write a PNG of a boolean ``[Tq, Tk]`` pattern, or of a method's patterns.

    Args:
      pattern_or_method: a bool ``[Tq, Tk]`` array, or a registered method name
        (rendered with :func:`efficient_attn.sparsity_pattern`, one panel per
        value of ``causal``).
      path: output file.
      tq, tk: lengths for a method (``tk`` defaults to ``tq``).
      causal: for a method, one bool or several (one panel each).
      title: figure title; for a method, defaults to the name and options.
      dpi: resolution.
      **options: method options.

    Returns:
      the path written. Dark cells are the pairs that interact.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(pattern_or_method, str):
        flags = [causal] if isinstance(causal, bool) else list(causal)
        tk = tq if tk is None else tk
        panels = [
            (
                "causal" if c else "full",
                sparsity_pattern(pattern_or_method, tq, tk, causal=c, **options),
            )
            for c in flags
        ]
        if title is None:
            opts = ", ".join(f"{k}={v}" for k, v in options.items())
            title = f"{pattern_or_method}({opts})" if opts else pattern_or_method
    else:
        pattern = np.asarray(pattern_or_method, bool)
        if pattern.ndim != 2:
            raise ValueError(f"pattern must be a 2-D bool array; got shape {pattern.shape}")
        panels = [("", pattern)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.5), squeeze=False)
    for ax, (name, pattern) in zip(axes[0], panels, strict=True):
        ax.imshow(pattern, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        density = pattern.mean()
        ax.set_title(f"{name} ({density:.0%} of pairs)" if name else f"{density:.0%} of pairs")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    return _save(fig, path, title, dpi)


def _save(fig, path, title: str | None, dpi: int) -> pathlib.Path:
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
    return _save(fig, path, title, dpi)


def doc_block_masks():
    """(file stem, title, BlockMask) of the mask-mod images in docs/patterns/."""
    from efficient_attn.core import mods
    from efficient_attn.core.blockmask import block_mask

    seg = (np.arange(256) * 5 // 256)[None]
    return (
        ("flex-documents", "document_mask(5 docs) & causal_mask()",
         block_mask(mods.document_mask(seg) & mods.causal_mask(), 256, 256, batch=1,
                    block_q=16, block_k=16)),
        ("flex-window", "sliding_window(40)",
         block_mask(mods.sliding_window(40), 256, 256, block_q=16, block_k=16)),
        ("flex-prefix", "prefix_lm(64)",
         block_mask(mods.prefix_lm(64), 256, 256, block_q=16, block_k=16)),
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="docs/patterns")
    args = parser.parse_args(argv)
    for method, length, options in DOC_PATTERNS:
        path = render_pattern(
            method, pathlib.Path(args.out_dir) / f"{method}.png", tq=length, **options
        )
        print(path)
    for stem, title, bm in doc_block_masks():
        print(render_block_mask(bm, pathlib.Path(args.out_dir) / f"{stem}.png", title=title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
