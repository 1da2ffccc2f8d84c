"""The axes a sweep preset may set, its settings, and how their values are checked.

:data:`AXIS_TABLE` declares every axis once (its preset key, default and
``efficient-attn sweep`` flag); :data:`SETTINGS` are the settings of the whole
sweep. The helpers here check a preset's or a flag's values (:func:`as_list`,
:func:`int_list`, :func:`choices`, :func:`option_grid`, :func:`check_methods`)
and parse the repeatable ``--option METHOD.NAME=V[,V]`` flag
(:func:`parse_option_flags`); a malformed value is a :class:`SpecError` that
lists what is valid.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
PASSES: tuple[str, ...] = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Axis:
    """One swept axis: its preset key, default, and ``efficient-attn sweep`` flag.

    ``flag`` is the argparse dest (None: preset only); ``kind`` says how the
    flag's text parses: ``int`` / ``str`` (comma lists), ``bool``
    (``--x/--no-x``) or ``options`` (repeatable ``METHOD.NAME=V[,V]``).
    """

    name: str
    default: Any
    flag: str | None
    kind: str
    help: str = ""


#: Every axis a preset or a ``[[grid]]`` may set (each is swept; a scalar is a list of
#: one): the one declaration that the preset checks, the CLI flags, the study flags and
#: the defaults read. A new axis is an entry here, a :class:`~efficient_attn.sweep.points.Point`
#: field (and its key suffix, written only when not the default so old keys stay valid) and
#: its loop in :func:`efficient_attn.sweep.spec._expand_grid`.
AXIS_TABLE: tuple[Axis, ...] = (
    Axis("methods", "all", "methods", "str", "comma-separated, or 'all'"),
    Axis("seq_lens", [1024], "seq_lens", "int", "e.g. 1024,2048,4096"),
    Axis("batch", 1, "batch", "int"),
    Axis("heads", 4, "heads", "int"),
    Axis(
        "kv_heads", None, "kv_heads", "int", "must divide --heads (1: multi-query)"
    ),  # None: =heads
    Axis("head_dim", 64, "head_dim", "int"),
    Axis("dtype", "float32", "dtype", "str", "float32, bfloat16 or float16 (comma list)"),
    Axis("causal", True, "causal", "bool"),
    Axis("passes", ["fwd"], "passes", "str", "fwd, fwd+bwd or both (comma list)"),
    Axis(
        "options",
        {},
        "option",
        "options",
        "method option values to sweep (repeatable), e.g. performer.num_features=64,256",
    ),
    Axis(
        "mods",
        ["none"],
        "mods",
        "str",
        "mask/score variants (ea.mods.VARIANTS), e.g. none,window:256,documents:16",
    ),
    Axis("devices", 1, None, "int"),
    Axis("strategy", "none", None, "str"),
)
AXES: tuple[str, ...] = tuple(a.name for a in AXIS_TABLE)
#: Sequence-parallel strategies (``efficient_attn.parallel.api.STRATEGIES``); None: one device.
STRATEGIES: tuple[str, ...] = ("ring", "all_to_all")
#: Settings of the whole sweep (top level only).
SETTINGS: dict[str, Any] = {
    "description": "",
    "note": "",
    "repeats": 5,
    "warmup": 1,
    "seed": 0,
    "timeout_s": 600.0,
    # slow points are timed with fewer repeats, about this many seconds in all (at least 1)
    "timing_budget_s": 60.0,
    # float64 reference only where B * N * Tq * Tk <= this (about 4 s of NumPy at 2**24)
    "reference_max_elements": 2**24,
    # run and time only where B * N * Tq * Tk <= this; beyond, compile only (memory); 0: no limit
    "time_max_elements": 0,
}
AXIS_DEFAULTS: dict[str, Any] = {a.name: a.default for a in AXIS_TABLE}


class SpecError(ValueError):
    """A malformed preset or argument; the message lists what is valid."""


def as_list(name: str, value: Any) -> list[Any]:
    """``value`` as a non-empty list (a scalar is a list of one); empty is a :class:`SpecError`."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise SpecError(f"{name} must not be empty")
    return values


def int_list(name: str, value: Any, minimum: int = 1) -> list[int]:
    """``value`` (an int or a list of ints) as a list, each ``>= minimum``."""
    values = as_list(name, value)
    for x in values:
        if not isinstance(x, int) or isinstance(x, bool) or x < minimum:
            raise SpecError(f"{name}={x!r} must be an int >= {minimum}")
    return values


def choices(name: str, value: Any, valid: Sequence[Any]) -> list[Any]:
    """``value`` as a non-empty list, each one of ``valid``."""
    values = as_list(name, value)
    for x in values:
        if x not in valid:
            listed = ", ".join(map(str, valid))
            raise SpecError(f"{name}={x!r} is not valid; valid values: {listed}")
    return values


def option_grid(method: str, options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product of a method's option table (a list value is swept)."""
    if not isinstance(options, Mapping):
        raise SpecError(f"options.{method} must be a table of option = value(s)")
    names = sorted(options)
    values = [as_list(f"options.{method}.{n}", options[n]) for n in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def check_methods(names: Sequence[str], registered: Sequence[str]) -> list[str]:
    """``names`` if all are registered (``["all"]`` means every one), else :class:`SpecError`."""
    if list(names) == ["all"]:
        return list(registered)
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise SpecError(f"unknown method(s) {unknown}; registered methods: {', '.join(registered)}")
    return list(names)


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_option_flags(
    flags: Sequence[str], registry: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, list[Any]]]:
    """``["performer.num_features=64,256"]`` -> ``{"performer": {"num_features": [64, 256]}}``.

    ``registry`` maps each registered method to its options (name -> default).
    """
    out: dict[str, dict[str, list[Any]]] = {}
    for flag in flags:
        target, eq, values = flag.partition("=")
        method, dot, name = target.partition(".")
        if not (eq and dot and method and name and values):
            raise SpecError(f"malformed --option {flag!r}: expected METHOD.NAME=VALUE[,VALUE...]")
        check_methods([method], list(registry))
        if name not in registry[method]:
            valid = ", ".join(registry[method]) or "none"
            raise SpecError(f"method {method!r} has no option {name!r}; its options: {valid}")
        out.setdefault(method, {})[name] = [_literal(v) for v in values.split(",")]
    return out
