"""Sweep presets and their expansion into points.

A preset is a plain-data TOML file under ``experiments/`` (one per figure or
table). Top-level keys give the axes; each ``[[grid]]`` table overrides some
of them, and the sweep is the union of the grids' cartesian products
(no ``[[grid]]``: one grid from the top-level keys). Example::

    description = "time and memory vs sequence length"
    methods = "all"                  # or ["dense", "performer"]
    seq_lens = [1024, 4096]
    heads = 4                        # an int or a list of ints
    passes = ["fwd", "fwd+bwd"]
    [options.performer]              # per-method options; a list is swept
    num_features = [64, 256]
    [[grid]]
    passes = ["fwd+bwd"]
    seq_lens = [1024]

Command-line flags override an axis in every grid. A point is one
(method, options, seq_len, batch, heads, kv_heads, head_dim, dtype, causal,
pass, seed, devices, strategy); its :attr:`Point.key` identifies it in
``results.jsonl``. ``strategy`` (``"ring"``, ``"all_to_all"``; ``"none"``, the
default, is ordinary one-device attention, swept with ``devices = 1`` only)
runs :func:`efficient_attn.parallel.sequence_parallel_attention` with the
sequence split over ``devices`` host devices (the worker process starts with
``--xla_force_host_platform_device_count``). ``time_max_elements`` (nonzero)
compiles points with ``B * N * T**2`` above it for memory only. A preset's
``note`` is printed at the top of its report.

The axes and their checks are in :mod:`efficient_attn.sweep.axes`, :class:`Point`
and :class:`Sweep` in :mod:`efficient_attn.sweep.points`; both are re-exported here.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from efficient_attn.sweep.axes import (  # noqa: F401  (re-exported: the axes)
    AXES,
    AXIS_DEFAULTS,
    AXIS_TABLE,
    DTYPES,
    PASSES,
    SETTINGS,
    STRATEGIES,
    Axis,
    SpecError,
    as_list,
    check_methods,
    choices,
    int_list,
    option_grid,
    parse_option_flags,
)
from efficient_attn.sweep.points import Point, Sweep, parse_shard  # noqa: F401  (re-exported)


def experiments_dirs() -> list[Path]:
    """Where presets are looked up: ``./experiments`` then the repository's ``experiments``."""
    here = Path.cwd() / "experiments"
    repo = Path(__file__).resolve().parents[2] / "experiments"
    return [here] if here.resolve() == repo.resolve() else [here, repo]


def _is_sweep_preset(path: Path) -> bool:
    """Whether ``path`` parses and has only sweep keys (other tools keep presets there too)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True  # listed, so that loading it reports the problem
    return set(data) <= {*SETTINGS, *AXES, "grid"}


def available_presets() -> dict[str, Path]:
    """Sweep preset name -> file, first match along :func:`experiments_dirs`."""
    found: dict[str, Path] = {}
    for d in experiments_dirs():
        for path in sorted(d.glob("*.toml")) if d.is_dir() else []:
            if path.stem not in found and _is_sweep_preset(path):
                found[path.stem] = path
    return found


def load_preset(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(name, data) of a preset given by name (``experiments/NAME.toml``) or path."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        presets = available_presets()
        if name_or_path not in presets:
            valid = ", ".join(presets) or "none found"
            raise SpecError(
                f"unknown experiment {name_or_path!r}; presets in "
                f"{' or '.join(str(d) for d in experiments_dirs())}: {valid} "
                "(or pass the path of a .toml file)"
            )
        path = presets[name_or_path]
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: {e}") from None
    return path.stem, data


def _check_keys(where: str, data: Mapping[str, Any], valid: Iterable[str]) -> None:
    valid = list(valid)
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")


def _expand_grid(grid: Mapping[str, Any], registered: Sequence[str], seed: int) -> list[Point]:
    methods = grid["methods"]
    methods = list(registered) if methods == "all" else as_list("methods", methods)
    seq_lens = int_list("seq_lens", grid["seq_lens"])
    batches = int_list("batch", grid["batch"])
    heads = int_list("heads", grid["heads"])
    kv_heads = None if grid["kv_heads"] is None else int_list("kv_heads", grid["kv_heads"])
    head_dims = int_list("head_dim", grid["head_dim"])
    dtypes = choices("dtype", grid["dtype"], DTYPES)
    causals = choices("causal", grid["causal"], (True, False))
    passes = choices("passes", grid["passes"], PASSES)
    devices = int_list("devices", grid["devices"])
    strategies = [
        None if s == "none" else s
        for s in choices("strategy", grid["strategy"], ("none", *STRATEGIES))
    ]
    if any(p != 1 for p in devices) and strategies == [None]:
        raise SpecError(
            f"devices={devices} needs a sequence-parallel strategy ({', '.join(STRATEGIES)}); "
            'strategy = "none" runs on one device'
        )
    from efficient_attn.core.mods import from_spec as mods_from_spec

    variants = as_list("mods", grid["mods"])
    for spec in variants:
        try:
            mods_from_spec(str(spec), 16, 16, 1)
        except ValueError as e:
            raise SpecError(str(e)) from None
    options = grid["options"]
    if not isinstance(options, Mapping):
        raise SpecError("options must be a table: [options.METHOD] NAME = value or [values]")
    points = []
    for dtype, causal, b, n, h, pass_, t in itertools.product(
        dtypes, causals, batches, heads, head_dims, passes, seq_lens
    ):
        for k in kv_heads or [n]:
            if n % k:
                divisors = [d for d in range(1, n + 1) if n % d == 0]
                raise SpecError(f"kv_heads={k} must divide heads={n}; valid kv_heads: {divisors}")
            for method in methods:
                for opts, strategy, p, mod in itertools.product(
                    option_grid(method, options.get(method, {})), strategies, devices, variants
                ):
                    if strategy is None and p != 1:
                        continue  # one-device attention: devices=1 only
                    points.append(
                        Point(method, opts, t, b, n, k, h, dtype, causal, pass_, seed, p, strategy,
                              str(mod))
                    )  # fmt: skip
    return points


def build_sweep(
    name: str,
    data: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    registered: Sequence[str] = (),
) -> Sweep:
    """Expand preset ``data`` (axes overridden by ``overrides``) into a :class:`Sweep`.

    ``registered`` lists the methods that ``methods = "all"`` means. Points are
    deduplicated (first occurrence wins) and ordered by sequence length, so
    every method's short points run first.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(f"preset {name!r}", data, [*SETTINGS, *AXES, "grid"])
    _check_keys("overrides", overrides, [*AXES, *SETTINGS])
    settings = {k: overrides.get(k, data.get(k, v)) for k, v in SETTINGS.items()}
    top = {k: data.get(k, v) for k, v in AXIS_DEFAULTS.items()}
    grids = data.get("grid", [{}])
    if not isinstance(grids, list) or not all(isinstance(g, Mapping) for g in grids):
        raise SpecError(f"preset {name!r}: grid must be an array of tables ([[grid]])")
    seed = int_list("seed", settings["seed"], minimum=0)[0]
    points: dict[str, Point] = {}
    for i, grid in enumerate(grids):
        _check_keys(f"preset {name!r} grid {i}", grid, AXES)
        merged = {**top, **grid}
        merged.update({k: v for k, v in overrides.items() if k in AXES and k != "options"})
        if "options" in overrides:
            base = dict(merged["options"])
            for method, opts in overrides["options"].items():
                base[method] = {**base.get(method, {}), **opts}
            merged["options"] = base
        for p in _expand_grid(merged, registered, seed):
            points.setdefault(p.key, p)
    ordered = sorted(points.values(), key=lambda p: p.seq_len)
    for field in ("timeout_s", "timing_budget_s"):
        value = settings[field]
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise SpecError(f"{field}={value!r} must be a positive number of seconds")
    return Sweep(
        name=name,
        description=str(settings["description"]),
        note=str(settings["note"]),
        points=tuple(ordered),
        repeats=int_list("repeats", settings["repeats"])[0],
        warmup=int_list("warmup", settings["warmup"], minimum=1)[0],
        timeout_s=float(settings["timeout_s"]),
        timing_budget_s=float(settings["timing_budget_s"]),
        reference_max_elements=int_list(
            "reference_max_elements", settings["reference_max_elements"], minimum=0
        )[0],
        time_max_elements=int_list("time_max_elements", settings["time_max_elements"], minimum=0)[
            0
        ],
    )
