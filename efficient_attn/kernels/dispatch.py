"""Choosing between the XLA tile engine and the fused kernels: ``implementation=``.

``"auto"`` (the methods' default) runs the fused kernel for the platform a
program is lowered for, through :func:`jax.lax.platform_dependent`: Triton on
CUDA, Mosaic on TPU, the XLA engine elsewhere, so one jitted function lowers
correctly for any backend. A call the kernels cannot run (another
:class:`~efficient_attn.core.engine.Score`, head_dim > 256, rows too long for
VMEM, ...) runs on the XLA engine instead; the reason is logged and
kept in :func:`fallbacks`. A user's ``block_mask`` at tiles the kernels cannot
run (larger than the :class:`~efficient_attn.kernels.TileConfig`'s, or not powers
of two) is re-planned from its ``mask_mod`` at the config's tiles. ``"pallas"``
requires the kernel (``ValueError`` with the reason otherwise); ``"xla"`` never
uses it. ``interpret=True`` runs the kernels on any device (Pallas'
interpreter), for tests on a CPU.

Tracing ``"auto"`` traces every branch, so that a program traced on a CPU still
lowers for CUDA or TPU (``jit(f).trace(...).lower(lowering_platforms=("cuda",))``);
on a CPU that is about half the tracing time of a tiled method's forward and
backward. :func:`kernel_branches` (or ``EFFICIENT_ATTN_KERNEL_BRANCHES``)
``"present"`` traces only the XLA engine in a process whose default backend is
the CPU; the default, ``"all"``, keeps every branch.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax

from efficient_attn.core import eager, engine
from efficient_attn.kernels import fused
from efficient_attn.kernels.common import Unsupported
from efficient_attn.kernels.config import TileConfig, default_config

#: Valid values of ``implementation``.
IMPLEMENTATIONS = ("auto", "xla", "pallas")

_log = logging.getLogger(__name__)
#: engine.attend's optional keywords, which the kernel branch reads.
_ENGINE_DEFAULTS = dict.fromkeys(
    ("mask_mod", "score_mod", "block_mask", "pattern", "params", "bias", "dropout", "bwd_tiles")
) | {"score": engine.DOT}
_FALLBACKS: collections.deque = collections.deque(maxlen=64)
#: Which branches an ``"auto"`` call traces: ``"all"`` or ``"present"`` (see the module).
BRANCH_MODES = ("all", "present")
BRANCHES_ENV = "EFFICIENT_ATTN_KERNEL_BRANCHES"
_BRANCHES: contextvars.ContextVar[str | None] = contextvars.ContextVar("branches", default=None)


def _branch_mode() -> str:
    mode = _BRANCHES.get() or os.environ.get(BRANCHES_ENV) or "all"
    if mode not in BRANCH_MODES:
        raise ValueError(f"{BRANCHES_ENV}={mode!r}; valid values: {', '.join(BRANCH_MODES)}")
    return mode


eager.register_trace_context(_branch_mode)


@contextlib.contextmanager
def kernel_branches(mode: str) -> Iterator[None]:
    """Within the block, ``implementation="auto"`` traces ``mode``'s branches: ``"all"``
    (lowerable for any platform) or ``"present"`` (on a CPU-only process, the XLA engine
    alone: faster to trace, lowerable for the CPU only). Set it before a function is
    first traced: ``jax.jit`` does not retrace a function when it changes."""
    if mode not in BRANCH_MODES:
        raise ValueError(f"kernel_branches({mode!r}); valid modes: {', '.join(BRANCH_MODES)}")
    token = _BRANCHES.set(mode)
    try:
        yield
    finally:
        _BRANCHES.reset(token)


def fallbacks() -> tuple[str, ...]:
    """Why recent ``implementation="auto"`` calls ran a platform's branch on the XLA engine."""
    return tuple(_FALLBACKS)


def check(implementation: Any, interpret: Any) -> str:
    """``implementation`` if it and ``interpret`` are valid, else ``ValueError``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r}; valid implementations: "
            f"{', '.join(map(repr, IMPLEMENTATIONS))}"
        )
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be a bool")
    if interpret and implementation == "xla":
        raise ValueError("interpret=True runs the Pallas kernels: use implementation='pallas'")
    if implementation == "pallas" and not interpret:
        platform = jax.default_backend()
        if platform not in ("gpu", "tpu"):
            raise ValueError(
                f"implementation='pallas' needs a GPU or TPU (the default backend is "
                f"{platform!r}); pass interpret=True to run the kernels on a CPU, or use "
                "implementation='auto'"
            )
    return implementation


def _fits(bm, tiles: tuple[int, int]) -> bool:
    """Whether the kernels can run ``bm``'s own tiles: powers of two, at most ``tiles``."""
    own = (bm.block_q, bm.block_k)
    ok = [t & (t - 1) == 0 and t <= c for t, c in zip(own, tiles, strict=True)]
    single = [bm.tiles.shape[2] == 1, bm.tiles.shape[3] == 1]  # one tile: any size is padded
    return all(o or s for o, s in zip(ok, single, strict=True))


def _block_masks(q, k, kw: dict, cfg: TileConfig):
    """The forward's block mask at the config's tiles (or the user's, where the kernels can
    run it) and the backward's (None: the same)."""
    b, tq, n = q.shape[:3]
    tk = k.shape[1]

    def replan(mask_mod, tiles):
        return engine.plan_block_mask(
            tq, tk, batch=b, heads=n, causal=False, mask_mod=mask_mod,
            block_q=min(tiles[0], tq), block_k=min(tiles[1], tk),
        )  # fmt: skip

    tiles = (cfg.block_q, cfg.block_k)
    bm = engine.plan_block_mask(
        tq, tk, batch=b, heads=n, causal=kw["causal"], mask_mod=kw["mask_mod"],
        block_mask=kw["block_mask"], block_q=min(tiles[0], tq), block_k=min(tiles[1], tk),
        pattern=kw["pattern"],
    )  # fmt: skip
    if not _fits(bm, tiles):  # a user's block mask at other tiles: re-plan its mask
        bm = replan(bm.mask_mod, tiles)
    if cfg.backward_tiles == tiles:
        return bm, None
    bwd = replan(bm.mask_mod, cfg.backward_tiles)
    return bm, None if (bwd.block_q, bwd.block_k) == (bm.block_q, bm.block_k) else bwd


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    implementation: str = "auto",
    interpret: bool = False,
    kernel_config: TileConfig | None = None,
    **kw: Any,
) -> tuple[jax.Array, jax.Array]:
    """:func:`efficient_attn.core.engine.attend` (its keywords ``kw``) on the engine
    ``implementation`` selects: ``"xla"`` (the tile engine), ``"auto"`` or ``"pallas"``.

    ``interpret`` runs the kernels in Pallas' interpreter; ``kernel_config`` (a
    :class:`~efficient_attn.kernels.TileConfig`; None: the backend's default)
    sets the kernels' tiles. What every tiled method with an ``implementation``
    option calls.
    """
    config = kernel_config
    kw = {**_ENGINE_DEFAULTS, **kw}
    if check(implementation, interpret) == "xla":
        return engine.attend(q, k, v, **kw)
    if config is not None and not isinstance(config, TileConfig):
        raise ValueError(f"kernel_config must be an ea.kernels.TileConfig or None; got {config!r}")

    def xla(q, k, v):
        return engine.attend(q, k, v, **kw)

    def kernel(backend: str, interp: bool):
        def run(q, k, v):
            if kw["score"] is not engine.DOT or kw["params"] is not None:
                raise Unsupported(f"score {kw['score']!r} (the kernels compute q . k)")
            here = jax.default_backend() == backend  # this machine's chip: its own tiles
            cfg = config or default_config(backend, jax.devices()[0].device_kind if here else None)
            bm, bwd = _block_masks(q, k, kw, cfg)
            return fused.fused_attention(
                q, k, v, scale=kw["scale"], block_mask=bm, kv_len=kw["kv_lengths"],
                score_mod=kw["score_mod"], backend=backend, config=cfg, interpret=interp,
                backward_block_mask=bwd, bias=kw["bias"], dropout=kw["dropout"],
            )  # fmt: skip

        return run

    def or_xla(backend: str, interp: bool = False):
        run = kernel(backend, interp)

        def branch(q, k, v):
            try:
                return run(q, k, v)
            except Unsupported as e:
                _FALLBACKS.append(f"{backend}: {e}")
                _log.info("no fused %s kernel for this call, XLA engine instead: %s", backend, e)
                return xla(q, k, v)
            except Exception as e:  # every branch is traced on every platform: never break one
                _FALLBACKS.append(f"{backend}: the kernel failed to trace: {type(e).__name__}: {e}")
                _log.warning("fused %s kernel failed to trace, XLA engine instead: %r", backend, e)
                return xla(q, k, v)

        return branch

    if implementation == "pallas":
        backend = "tpu" if not interpret and jax.default_backend() == "tpu" else "gpu"
        try:
            return kernel(backend, interpret)(q, k, v)
        except Unsupported as e:
            raise ValueError(f"implementation='pallas' cannot run this call: {e}") from None
    if interpret:
        return or_xla("gpu", True)(q, k, v)
    if _branch_mode() == "present" and jax.default_backend() == "cpu":
        return xla(q, k, v)
    return jax.lax.platform_dependent(q, k, v, cuda=or_xla("gpu"), tpu=or_xla("tpu"), default=xla)
