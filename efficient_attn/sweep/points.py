"""The points of an expanded sweep: :class:`Point` and :class:`Sweep`.

A point is one (method, options, seq_len, batch, heads, kv_heads, head_dim,
dtype, causal, pass, seed, devices, strategy, mods); its :attr:`Point.key`
identifies it in ``results.jsonl``. A :class:`Sweep` is an expanded preset:
its points and how to measure them, split into shards by :func:`parse_shard`'s
``I/N``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from efficient_attn.sweep.axes import SpecError


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
