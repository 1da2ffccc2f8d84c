"""Regenerate the pattern and block-mask images in ``docs/patterns/`` (needs ``matplotlib``).

    python scripts/render_patterns.py [out_dir (default: docs/patterns)]

Method patterns are drawn by :func:`efficient_attn.core.patterns.render_pattern`
(both ``causal`` settings), block masks by ``BlockMask.render``'s
:func:`efficient_attn.core.blockmask.inspection.render_block_mask`.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence

import numpy as np

from efficient_attn.core import mods
from efficient_attn.core.blockmask import block_mask
from efficient_attn.core.blockmask.inspection import render_block_mask
from efficient_attn.core.patterns import render_pattern

#: (method, length, options) of the images in docs/patterns/: small options so
#: the structure is visible at a glance.
DOC_PATTERNS: tuple[tuple[str, int, dict[str, int]], ...] = (
    ("local", 128, {"window": 16}),
    ("strided", 128, {"window": 16, "stride": 16}),
    ("bigbird", 128, {"block": 8, "num_global_blocks": 2, "num_random_blocks": 2, "seed": 0}),
)


def doc_block_masks():
    """(file stem, title, BlockMask) of the mask-mod images in docs/patterns/."""
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
