"""Block masks: which tiles of the ``[Tq, Tk]`` scores a ``mask_mod`` leaves empty, partial or full.

FlexAttention's ``BlockMask`` (Dong et al. 2024) and splash attention's
``MaskInfo``: the tile engine (:mod:`efficient_attn.core.engine`) skips empty tiles,
runs full tiles without evaluating the mask and masks partial tiles with the
``mask_mod`` itself. Masks over indices only are evaluated once at trace time
(compiled, on the CPU) and cached as NumPy arrays, so they are constants of
the program; masks over data (segment ids, per-example prefix lengths) are
built on device inside ``jit``, so new values never retrace or recompile.

The modules: ``mask`` (the :class:`BlockMask` pytree, the engine's tile
lists), ``hoist`` (a mod traced with its captured arrays made arguments; :func:`lift`:
a plain closure as a pytree whose leaves are those arrays),
``classify`` (tile classification), ``build`` (:func:`block_mask`, :func:`build`,
the cache) and ``inspection`` (rendering a block mask as a PNG).

"""

from collections.abc import Sequence

# __all__ is the public API; the other names are for the engine, kernels, methods and tests.
from efficient_attn.core.blockmask.build import (  # noqa: F401
    and_block_masks,
    block_mask,
    build,
    build_inferred,
    positions,
)
from efficient_attn.core.blockmask.hoist import (  # noqa: F401
    Hoisted,
    check_mask_output,
    hoist,
    join_mod,
    lift,
    split_mod,
)
from efficient_attn.core.blockmask.inspection import render_block_mask  # noqa: F401
from efficient_attn.core.blockmask.mask import (  # noqa: F401
    EMPTY,
    FULL,
    PARTIAL,
    BlockMask,
    check_block_mask,
    group_lists,
    union_lists,
)

__all__: Sequence[str] = (
    "BlockMask",
    "and_block_masks",
    "block_mask",
    "build",
    "build_inferred",
    "hoist",
)
