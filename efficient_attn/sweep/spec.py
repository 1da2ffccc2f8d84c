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
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
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
#: the defaults read. A new axis is an entry here, a :class:`Point` field (and its key
#: suffix, written only when not the default so old keys stay valid) and its loop in
#: :func:`_expand_grid`.
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
_AXIS_DEFAULTS: dict[str, Any] = {a.name: a.default for a in AXIS_TABLE}


class SpecError(ValueError):
    """A malformed preset or argument; the message lists what is valid."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One measurement: a method with options on one shape, dtype, mask and pass."""

    method: str
    options: Mapping[str, Any]
    seq_len: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    pass_: str
    seed: int = 0
    devices: int = 1
    strategy: str | None = None
    mods: str = "none"

    @property
    def key(self) -> str:
        """Stable identity of the point, stored with its row (resume skips known keys)."""
        opts = json.dumps(dict(self.options), sort_keys=True, separators=(",", ":"))
        return (
            f"{self.method}|{opts}|L{self.seq_len}|B{self.batch}|N{self.heads}|K{self.kv_heads}"
            f"|H{self.head_dim}|{self.dtype}|{'causal' if self.causal else 'full'}"
            f"|{self.pass_}|seed{self.seed}"
            + (f"|P{self.devices}" if self.devices != 1 else "")
            + (f"|sp={self.strategy}" if self.strategy is not None else "")
            + (f"|mods={self.mods}" if self.mods != "none" else "")
        )

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        name = f"{self.method}({opts})" if opts else self.method
        where = f" {self.strategy} P={self.devices}" if self.strategy is not None else ""
        where += f" [{self.mods}]" if self.mods != "none" else ""
        return f"{name}{where} L={self.seq_len} {self.pass_} {self.dtype}"

    def identity(self) -> dict[str, Any]:
        """The row fields that describe the point (``pass`` spelled as in the rows)."""
        return {
            "key": self.key,
            "method": self.method,
            "options": dict(self.options),
            "seq_len": self.seq_len,
            "batch": self.batch,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "causal": self.causal,
            "pass": self.pass_,
            "seed": self.seed,
            "devices": self.devices,
            "strategy": self.strategy,
            "mods": self.mods,
        }

    @classmethod
    def from_identity(cls, d: Mapping[str, Any]) -> Point:
        return cls(
            method=d["method"],
            options=dict(d.get("options") or {}),
            seq_len=int(d["seq_len"]),
            batch=int(d["batch"]),
            heads=int(d["heads"]),
            kv_heads=int(d["kv_heads"]),
            head_dim=int(d["head_dim"]),
            dtype=str(d["dtype"]),
            causal=bool(d["causal"]),
            pass_=str(d["pass"]),
            seed=int(d.get("seed", 0)),
            devices=int(d.get("devices") or 1),
            strategy=d.get("strategy"),
            mods=str(d.get("mods") or "none"),
        )


@dataclasses.dataclass(frozen=True)
class Sweep:
    """An expanded preset: its points and how to measure them."""

    name: str
    description: str
    points: tuple[Point, ...]
    repeats: int
    warmup: int
    timeout_s: float
    timing_budget_s: float
    reference_max_elements: int
    note: str = ""
    time_max_elements: int = 0

    def shard(self, index: int, count: int) -> tuple[Point, ...]:
        """Every ``count``-th point starting at ``index``: shards partition the sweep."""
        return self.points[index::count]


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


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with ``0 <= I < N``."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise SpecError(
            f"malformed shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4 "
            "(Slurm: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-3)"
        ) from None
    if count < 1 or not 0 <= index < count:
        n = max(count, 1)
        raise SpecError(f"shard {text!r}: need N >= 1 and 0 <= I < N (e.g. 0/{n} ... {n - 1}/{n})")
    return index, count


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


def _choices(name: str, value: Any, valid: Sequence[Any]) -> list[Any]:
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
    dtypes = _choices("dtype", grid["dtype"], DTYPES)
    causals = _choices("causal", grid["causal"], (True, False))
    passes = _choices("passes", grid["passes"], PASSES)
    devices = int_list("devices", grid["devices"])
    strategies = [
        None if s == "none" else s
        for s in _choices("strategy", grid["strategy"], ("none", *STRATEGIES))
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
    top = {k: data.get(k, v) for k, v in _AXIS_DEFAULTS.items()}
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
