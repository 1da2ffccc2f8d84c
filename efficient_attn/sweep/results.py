"""The results of every experiment: one store of rows, and the data model reports read.

Store: rows are JSON objects, one per line, in ``DIR/results.jsonl``
(``DIR/results.shard-I-of-N.jsonl`` for a shard). Every row has a ``key`` (the
point's stable identity) and a ``status`` (``ok``, ``unsupported``, ``oom``,
``error``). A row is appended with one ``write`` and an ``fsync`` under an
``fcntl`` lock (:func:`append_row`: writers in several processes never
interleave); unparsable lines (a row torn by a kill) are skipped and a new row
never continues a torn line; when several rows share a key the latest wins
(:func:`latest_rows`). ``DIR/sweep.json`` holds the run's settings, command and
point list (:func:`write_meta`, :func:`sweep_meta`).

Data model of the sweep's rows (:func:`group`): a :class:`Panel` is the
settings one table or figure shares, a :class:`PanelData` its variants x
lengths cells, a :class:`Metric` what a table shows. ``report`` and ``plots``
both read these; neither imports the other.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from efficient_attn.sweep.spec import PASSES

RESULTS = "results.jsonl"
#: The reference methods: crossover lengths are measured against them, family panels repeat them.
BASELINES: tuple[str, ...] = ("dense", "xla")
_INF = float("inf")


def results_name(shard: tuple[int, int] | None) -> str:
    if shard is None or shard[1] == 1:
        return RESULTS
    return f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"


def results_files(path: str | Path) -> list[Path]:
    """``path`` itself if a file, else the ``results*.jsonl`` files in the directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.glob("results*.jsonl")) if path.is_dir() else []


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of one JSONL file; unparsable lines (torn by a kill) are skipped."""
    rows = []
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return rows
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict) and "key" not in row and "name" in row:
            row["key"] = row["name"]  # quality rows written before rows had keys
        if isinstance(row, dict) and "key" in row and "status" in row:
            rows.append(row)
    return rows


def append_row(
    path: str | Path, row: dict[str, Any], unless: Callable[[], bool] | None = None
) -> bool:
    """Append ``row`` as one line with a single ``write``, then ``fsync``; False if not written.

    The file is locked (``fcntl``, exclusive) from the torn-line check to the ``fsync``, so
    writers in several processes never interleave. ``unless()``, called under the lock,
    returning True skips the write (the harness: another process recorded the point).
    """
    data = (json.dumps(row, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        if unless is not None and unless():
            return False
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # the last line was torn: never glue a row onto it
        written = os.write(fd, data)
        while written < len(data):  # regular files write fully; be safe anyway
            written += os.write(fd, data[written:])
        os.fsync(fd)
        return True
    finally:
        os.close(fd)  # closing drops the lock


def latest_rows(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """key -> the latest row among every ``results*.jsonl`` in ``out_dir``."""
    latest: dict[str, dict[str, Any]] = {}
    for path in results_files(out_dir):
        for row in read_rows(path):
            latest[row["key"]] = row
    return latest


def write_meta(out_dir: str | Path, meta: dict[str, Any]) -> None:
    """``out_dir/sweep.json``, replaced atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir / f".sweep.json.{socket.gethostname()}.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out_dir / "sweep.json")


def merge_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Rows of every results file under ``paths``; a later row with the same key wins."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        files = results_files(path)
        if not files:
            raise ValueError(f"no results*.jsonl at {path}")
        for f in files:
            for row in read_rows(f):
                merged.pop(row["key"], None)
                merged[row["key"]] = row
    return list(merged.values())


def infeasible(row: dict[str, Any]) -> bool:
    """Out of memory or out of time: a longer sequence of the same family would be too."""
    return row["status"] == "oom" or str(row.get("message", "")).startswith("timeout")


def sweep_meta(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The run's ``sweep.json`` (name, description, settings, command) under ``paths``, or {}."""
    for p in paths:
        meta = Path(p) / "sweep.json"
        if meta.is_file():
            try:
                return json.loads(meta.read_text())
            except json.JSONDecodeError:
                continue
    return {}


@dataclasses.dataclass(frozen=True)
class Panel:
    """The settings shared by one table/figure."""

    pass_: str
    dtype: str
    causal: bool
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    strategy: str | None = None

    @property
    def slug(self) -> str:
        mask = "causal" if self.causal else "full"
        return (
            f"{self.pass_.replace('+', '')}-{self.dtype}-{mask}-b{self.batch}-n{self.heads}"
            f"-k{self.kv_heads}-h{self.head_dim}"
            + (f"-{self.strategy.replace('_', '')}" if self.strategy else "")
        )

    @property
    def title(self) -> str:
        mask = "causal" if self.causal else "non-causal"
        return (
            f"{self.pass_}, {self.dtype}, {mask}, batch {self.batch}, {self.heads} heads, "
            f"{self.kv_heads} kv heads, head dim {self.head_dim}"
            + (f", sequence parallel: {self.strategy}" if self.strategy else "")
        )

    @classmethod
    def of(cls, row: dict[str, Any]) -> Panel:
        return cls(
            row["pass"],
            row["dtype"],
            bool(row["causal"]),
            row["batch"],
            row["heads"],
            row["kv_heads"],
            row["head_dim"],
            row.get("strategy"),
        )


def variant(row: dict[str, Any]) -> str:
    """Method name with its non-default options, e.g. ``performer(num_features=64)``.

    Sequence-parallel points add strategy and device count: ``blockwise ring P=8``.
    """
    opts = ",".join(f"{k}={v}" for k, v in sorted((row.get("options") or {}).items()))
    name = f"{row['method']}({opts})" if opts else row["method"]
    if row.get("strategy"):
        name += f" {row['strategy']} P={row.get('devices') or 1}"
    if row.get("mods") not in (None, "none"):
        name += f" [{row['mods']}]"
    return name


@dataclasses.dataclass
class PanelData:
    panel: Panel
    variants: list[str]
    lengths: list[int]
    cells: dict[tuple[str, int], dict[str, Any]]

    def values(self, name: str, metric: Callable[[dict], float | None]) -> dict[int, float]:
        """Length -> value of ``metric`` where the point ran (``inf`` where it hit OOM)."""
        out = {}
        for t in self.lengths:
            row = self.cells.get((name, t))
            if row is None:
                continue
            if row["status"] == "ok" and metric(row) is not None:
                out[t] = metric(row)
            elif row["status"] == "oom":
                out[t] = _INF
        return out


def group(rows: Iterable[dict[str, Any]]) -> list[PanelData]:
    """Rows -> panels (forward first), variants in order of first appearance."""
    panels: dict[Panel, PanelData] = {}
    for row in rows:
        p = Panel.of(row)
        data = panels.setdefault(p, PanelData(p, [], [], {}))
        name = variant(row)
        if name not in data.variants:
            data.variants.append(name)
        if row["seq_len"] not in data.lengths:
            data.lengths.append(row["seq_len"])
        data.cells[(name, row["seq_len"])] = row
    for data in panels.values():
        data.lengths.sort()
    order = {p: i for i, p in enumerate(PASSES)}
    return sorted(panels.values(), key=lambda d: order.get(d.panel.pass_, len(order)))


def time_ms(row: dict[str, Any]) -> float | None:
    return row.get("time_ms")


def memory_mib(row: dict[str, Any]) -> float | None:
    b = row.get("memory_bytes")
    return None if b is None else b / 2**20


def rel_error(row: dict[str, Any]) -> float | None:
    return row.get("rel_error")


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    caption: str
    unit: str
    value: Callable[[dict], float | None]
    fit: bool
    title: str
    optional: bool = False  # only rows that carry it (mods sweeps): other variants are left out


TIME = Metric("time", "Time per call", "ms, median", time_ms, True, "Time vs sequence length")
MEMORY = Metric(
    "memory",
    "Compiled memory",
    "MiB, temp + arguments + outputs",
    memory_mib,
    True,
    "Compiled memory (temp + arguments + outputs) vs sequence length",
)
ERROR = Metric(
    "error",
    "Relative error vs float64",
    "Frobenius",
    rel_error,
    False,
    "Error vs exact attention",
)


def _executed_over_useful(row: dict[str, Any]) -> float | None:
    useful, executed = row.get("useful_flops_fwd"), row.get("executed_flops_fwd")
    return None if not useful or executed is None else executed / useful


def tflops(row: dict[str, Any]) -> float | None:
    """Useful TFLOP/s (FLOP convention of :func:`efficient_attn.bench.attention_flops`).

    Accelerator rows only: the GPU/TPU presets' throughput column (CPU reports unchanged).
    """
    if (row.get("env") or {}).get("platform") not in ("gpu", "tpu"):
        return None
    f = row.get("flops_per_s")
    return None if f is None else f / 1e12


THROUGHPUT = Metric("tflops", "Throughput", "TFLOP/s, useful FLOPs", tflops, False,
                    "Throughput vs sequence length", optional=True)  # fmt: skip

#: Block-mask figures of points with a ``mods`` variant on a tiled method.
MOD_METRICS = (
    Metric("density", "Block density (tiles computed)", "fraction",
           lambda r: r.get("block_density"), False, "Block density vs length", optional=True),
    Metric("executed", "Executed / useful FLOPs", "ratio", _executed_over_useful, False,
           "Executed over useful FLOPs vs sequence length", optional=True),
    Metric("build", "Block-mask build", "ms, first call", lambda r: r.get("block_mask_build_ms"),
           False, "Block-mask build time vs sequence length", optional=True),
)  # fmt: skip
