"""Copy the parameters of a linen layer or model into its NNX twin."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx, traverse_util

#: linen submodule names ``<name>_<i>`` that are the NNX list ``<list>[i]``.
_LISTS = {"block": "blocks", "encoder": "encoder", "decoder": "decoder"}


def _nnx_path(path: tuple[str, ...]) -> tuple[Any, ...]:
    out: list[Any] = []
    for part in path:
        m = re.fullmatch(r"([a-z]+)_(\d+)", part)
        if m and m.group(1) in _LISTS:
            out += [_LISTS[m.group(1)], int(m.group(2))]
        else:
            out.append(part)
    return tuple(out)


def load_linen(module: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Set ``module``'s parameters, in place, to the linen ``variables`` (or their ``"params"``).

    ``module`` is the NNX twin of the linen layer or model that made
    ``variables`` (same config): :class:`MultiHeadAttention`, :class:`DecoderLM`,
    :class:`Classifier`. Every parameter must match by name and shape, else ``ValueError``.
    Returns ``module``.
    """
    params = variables.get("params", variables)
    state = nnx.state(module, nnx.Param)
    target = traverse_util.flatten_dict(state.to_pure_dict())
    given = {_nnx_path(p): v for p, v in traverse_util.flatten_dict(dict(params)).items()}
    missing, extra = (
        sorted(set(target) - set(given), key=str),
        sorted(set(given) - set(target), key=str),
    )
    if missing or extra:
        raise ValueError(
            f"linen params do not match the module: missing {missing}, unexpected {extra}"
        )
    for path, value in given.items():
        if jnp.shape(value) != jnp.shape(target[path]):
            raise ValueError(
                f"param {'/'.join(map(str, path))} has shape {jnp.shape(value)}; "
                f"the module's is {jnp.shape(target[path])}"
            )
    state.replace_by_pure_dict(traverse_util.unflatten_dict(given))
    nnx.update(module, state)
    return module
