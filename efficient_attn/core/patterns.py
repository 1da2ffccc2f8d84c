"""Render sparsity patterns as images, for docs and papers (needs ``matplotlib``).

:func:`render_pattern` draws a boolean ``[Tq, Tk]`` pattern or a method's
:func:`efficient_attn.sparsity_pattern`; block masks render with
:func:`efficient_attn.core.blockmask.inspection.render_block_mask` (re-exported
here). ``python scripts/render_patterns.py docs/patterns`` regenerates the images
in ``docs/patterns/``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from efficient_attn.core.api import sparsity_pattern
from efficient_attn.core.blockmask.inspection import render_block_mask, save_figure  # noqa: F401


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
    return save_figure(fig, path, title, dpi)
