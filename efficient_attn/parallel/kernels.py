"""Resolving a method's ring kernels for ``strategy='ring'``.

The kernels themselves (exact attention of a query shard over one key shard,
returning out and lse) are registered on each method as ``ring=``; the tile
engine's are :func:`efficient_attn.core.engine.flash_ring_kernels`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from efficient_attn.core.registry import get_method, methods


@dataclasses.dataclass(frozen=True)
class RingKernel:
    """A method's (out, lse) kernel pair with its resolved options (hashable)."""

    method: str
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def resolve(cls, method: str, options: Mapping[str, Any]) -> RingKernel:
        """Look ``method`` up; approximate methods and exact ones without a kernel raise."""
        spec = get_method(method)
        valid = ", ".join(ring_methods())
        if not spec.exact:
            raise ValueError(
                f"strategy='ring' needs an exact method; {method!r} is approximate "
                f"(use strategy='all_to_all' for it). Ring methods: {valid}"
            )
        if spec.ring is None:
            raise ValueError(
                f"method {method!r} has no (out, lse) kernel for strategy='ring'; "
                f"ring methods: {valid} (strategy='all_to_all' runs any method)"
            )
        opts = spec.resolve_options(options)
        kernel = cls(method, tuple(sorted(opts.items())))
        kernel.kernels()  # validates option values now, not inside shard_map
        return kernel

    def kernels(self) -> tuple[Callable, Callable]:
        return get_method(self.method).ring(**dict(self.options))


def ring_methods() -> tuple[str, ...]:
    """Methods usable as the inner computation of ``strategy='ring'`` (registered ``ring=``)."""
    return tuple(sorted(m for m in methods() if get_method(m).ring is not None))
