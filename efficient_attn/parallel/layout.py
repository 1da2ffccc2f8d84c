"""Sequence layouts over a mesh axis: shard_map, padding, zigzag relayout, token positions.

The global sequence is split into ``P`` contiguous shards along a mesh axis of
size ``P``. For causal ring attention the shards are re-laid out in zigzag
order (Brandon et al. 2023, "Striped Attention"; the zigzag variant of
Llama 3 / ring-flash-attention): the sequence is cut into ``2P`` chunks and
device ``d`` holds chunks ``d`` and ``2P - 1 - d``, so every device owns as
many early (cheap) as late (expensive) queries and does the same causal work.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficient_attn.core import masking

if hasattr(jax, "shard_map"):
    _shard_map = jax.shard_map
else:  # jax < 0.7
    from jax.experimental.shard_map import shard_map as _shard_map

_NO_CHECK = (
    {"check_vma": False}
    if "check_vma" in inspect.signature(_shard_map).parameters
    else {"check_rep": False}
)


def shard_map(f: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """``shard_map`` without replication checks (the attention kernels carry
    device-varying loop state that the checker would reject)."""
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **_NO_CHECK)


def seq_spec(axis: str) -> PartitionSpec:
    """``[B, T, ...]`` split along ``T`` over ``axis``."""
    return PartitionSpec(None, axis)


def is_explicit(mesh: Mesh, axis: str) -> bool:
    """Whether mesh axis ``axis`` is Explicit (``jax.make_mesh``'s default in recent JAX)."""
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=False))
    return explicit is not None and types.get(axis) == explicit


def constrain(x: jax.Array, mesh: Mesh, axis: str, split: bool) -> jax.Array:
    """Lay ``x [B, T, ...]`` out split along T over ``axis`` (or replicated if not ``split``)."""
    sharding = NamedSharding(mesh, seq_spec(axis) if split else PartitionSpec())
    if is_explicit(mesh, axis):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def pad_seq(x: jax.Array, length: int, mesh: Mesh, axis: str) -> jax.Array:
    """Zero-pad ``x [B, T, ...]`` to ``length`` and split it along T over ``axis``.

    Explicit meshes cannot pad a dimension they split unevenly, so ``x`` is
    split where its length allows it and gathered only where it does not.
    """
    if not is_explicit(mesh, axis):
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    x = constrain(x, mesh, axis, split=x.shape[1] % mesh.shape[axis] == 0)
    x = jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return constrain(x, mesh, axis, split=True)


def unpad_seq(x: jax.Array, length: int, mesh: Mesh, axis: str) -> jax.Array:
    """``x[:, :length]``, split along T over ``axis`` where ``length`` divides evenly."""
    split = length % mesh.shape[axis] == 0
    if length != x.shape[1]:
        if is_explicit(mesh, axis) and not split:
            x = constrain(x, mesh, axis, split=False)
        x = jax.lax.slice_in_dim(x, 0, length, axis=1)
    return constrain(x, mesh, axis, split=split)


def padded_length(t: int, multiple: int) -> int:
    return masking.cdiv(t, multiple) * multiple


def _zigzag_dest(chunk: int, size: int) -> int:
    return chunk if chunk < size else 2 * size - 1 - chunk


def _zigzag_perms(size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Where device ``d``'s first (chunk 2d) and second (chunk 2d+1) halves go."""
    first = [(d, _zigzag_dest(2 * d, size)) for d in range(size)]
    second = [(d, _zigzag_dest(2 * d + 1, size)) for d in range(size)]
    return first, second


def to_zigzag(x: jax.Array, axis: str, size: int) -> jax.Array:
    """Inside shard_map: contiguous shard ``[B, 2c, ...]`` -> zigzag shard ``[B, 2c, ...]``.

    Device ``d`` receives exactly one even and one odd chunk of ``{d, 2P-1-d}``
    (their sum is odd), so two ``ppermute`` calls move every half once.
    """
    c = x.shape[1] // 2
    first, second = _zigzag_perms(size)
    even = jax.lax.ppermute(x[:, :c], axis, first)  # the even chunk of {d, 2P-1-d}
    odd = jax.lax.ppermute(x[:, c:], axis, second)
    d_even = jax.lax.axis_index(axis) % 2 == 0  # then chunk d (first) is the even one
    return jnp.concatenate([jnp.where(d_even, even, odd), jnp.where(d_even, odd, even)], axis=1)


def from_zigzag(x: jax.Array, axis: str, size: int) -> jax.Array:
    """Inside shard_map: the inverse of :func:`to_zigzag`."""
    c = x.shape[1] // 2
    first, second = _zigzag_perms(size)
    d_even = jax.lax.axis_index(axis) % 2 == 0
    lo, hi = x[:, :c], x[:, c:]
    even = jax.lax.ppermute(jnp.where(d_even, lo, hi), axis, [(b, a) for a, b in first])
    odd = jax.lax.ppermute(jnp.where(d_even, hi, lo), axis, [(b, a) for a, b in second])
    return jnp.concatenate([even, odd], axis=1)


def positions(src: jax.Array, length: int, size: int, *, zigzag: bool, offset: int) -> jax.Array:
    """int32 ``[length]`` token positions (plus ``offset``) of device ``src``'s shard."""
    if zigzag:
        half = length // 2
        base = jnp.arange(half, dtype=jnp.int32)
        pos = jnp.concatenate([base + src * half, base + (2 * size - 1 - src) * half])
    else:
        pos = jnp.arange(length, dtype=jnp.int32) + src * length
    return pos + offset
