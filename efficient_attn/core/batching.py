"""Leading batch dimensions: ``[..., T, N, H]`` inputs as one batch dimension and back.

Flax's ``dot_product_attention`` and tokamax accept any number of leading
batch dims; the methods see exactly one. :class:`Batch` flattens the inputs
to ``[B, T, N, H]`` with ``B`` the product of the leading dims (row-major,
so a mod's ``b`` is the flattened index), the per-example arguments
(lengths ``[...]``, segment ids ``[..., T]``) and the broadcastable ones
(bias, mask ``[..., N, T, S]``, right-aligned as in ``jax.nn``) with them,
and restores the leading dims of the results. Unbatched ``[T, N, H]``
inputs are a batch of one (``jax.nn``'s rule: their lengths are ``[1]``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Batch:
    """The leading batch dims of one call's inputs (``()`` for unbatched ``[T, N, H]``)."""

    dims: tuple[int, ...]

    @classmethod
    def of(cls, query: jax.Array, key: jax.Array, value: jax.Array | None) -> Batch:
        """The leading dims shared by ``query [..., Tq, N, H]``, ``key`` and ``value``."""
        arrays = {"query": query, "key": key, "value": value}
        for name, x in arrays.items():
            shape = getattr(x, "shape", None)
            if x is not None and (shape is None or len(shape) < 3):
                raise ValueError(
                    f"{name} must have rank >= 3 [..., seq, heads, head_dim] (any number of "
                    f"leading batch dims); got shape {shape}"
                )
        ranks = {n: x.ndim for n, x in arrays.items() if x is not None}
        if len(set(ranks.values())) != 1:
            raise ValueError(
                f"query, key and value must have the same rank ([..., T, N, H] with the same "
                f"leading batch dims); got ranks {ranks}"
            )
        dims = tuple(query.shape[:-3])
        for name, x in arrays.items():
            if x is not None and tuple(x.shape[:-3]) != dims:
                raise ValueError(
                    f"batch sizes differ: query {dims}, {name} {tuple(x.shape[:-3])} (the "
                    "leading dims of query, key and value must be equal)"
                )
        return cls(dims)

    @property
    def size(self) -> int:
        """The flattened batch size ``B`` (1 for unbatched inputs)."""
        return math.prod(self.dims)

    @property
    def single(self) -> bool:
        """True when the inputs already have exactly one batch dim (nothing to reshape)."""
        return len(self.dims) == 1

    @property
    def _arg_dims(self) -> tuple[int, ...]:
        return self.dims or (1,)

    def flatten(self, x: jax.Array) -> jax.Array:
        """``[..., *rest]`` -> ``[B, *rest]``."""
        return jnp.reshape(x, (self.size, *x.shape[len(self.dims) :]))

    def unflatten(self, x: jax.Array) -> jax.Array:
        """``[B, *rest]`` -> ``[..., *rest]``."""
        return jnp.reshape(x, (*self.dims, *x.shape[1:]))

    def per_example(self, name: str, x: Any, tail: tuple[int, ...] = ()) -> jax.Array | None:
        """``x [..., *tail]`` (or already ``[B, *tail]``) as ``[B, *tail]``; None stays None."""
        if x is None:
            return None
        arr = jnp.asarray(x)
        shapes = {(*self.dims, *tail), (*self._arg_dims, *tail), (self.size, *tail)}
        if tuple(arr.shape) not in shapes:
            want = " or ".join(str(list(s)) for s in sorted(shapes, key=len))
            raise ValueError(
                f"{name} must have shape {want} (the inputs' leading batch dims "
                f"{list(self.dims)}{', then ' + str(list(tail)) if tail else ''}); got {arr.shape}"
            )
        return arr.reshape(self.size, *tail)

    def broadcast(self, name: str, x: Any, tail: tuple[int, ...]) -> jax.Array | None:
        """``x`` broadcastable to ``[..., *tail]`` (right-aligned) as ``[B|1, *tail']`` with each
        of ``tail'`` 1 or the full size; None stays None."""
        if x is None:
            return None
        arr = jnp.asarray(x)
        full = (*self._arg_dims, *tail)
        if arr.ndim > len(full):
            raise ValueError(
                f"{name} of shape {arr.shape} has more dims than [..., N, T, S]={full}; it must "
                "broadcast to it (lower ranks are right-aligned)"
            )
        shape = (1,) * (len(full) - arr.ndim) + tuple(arr.shape)
        if any(s not in (1, f) for s, f in zip(shape, full, strict=True)):
            raise ValueError(f"{name} of shape {arr.shape} does not broadcast to {full}")
        lead, rest = shape[: len(self._arg_dims)], shape[len(self._arg_dims) :]
        arr = arr.reshape(shape)
        if all(s == 1 for s in lead):
            return arr.reshape(1, *rest)
        return jnp.broadcast_to(arr, (*self._arg_dims, *rest)).reshape(self.size, *rest)

    def options(self, arrays: Mapping[str, tuple[str, ...]], options: dict[str, Any]) -> dict:
        """``options`` with the array options declared ``("B", ...)`` (in ``arrays``: name ->
        dim names) flattened where given with the inputs' leading dims ``[..., *rest]``."""
        out = dict(options)
        for name, dims in arrays.items():
            x = out.get(name)
            lead = len(dims) - 1 + len(self.dims)
            if x is not None and dims[:1] == ("B",) and getattr(x, "ndim", None) == lead:
                out[name] = self.flatten(jnp.asarray(x))
        return out
