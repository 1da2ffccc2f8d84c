"""Quality grid: train every method on synthetic recall tasks of growing difficulty.

A preset (TOML under ``experiments/``, e.g. ``experiments/quality.toml``)::

    description = "..."
    methods = "all"                 # or a list
    [train]                         # TrainConfig fields shared by every run
    steps = 600
    [options.local]                 # per-method options for every run
    window = 8
    [[grid]]                        # one task; exactly one list-valued field = the difficulty axis
    task = "mqar"
    seq_len = 64
    num_pairs = [2, 4, 8]

Each (grid point, method) is one training run under ``OUT/runs/<name>/``;
finished runs (``final.json``) are skipped and killed ones resume from their
checkpoint, so re-running the command continues the grid. ``OUT/results.jsonl``
collects one row per run and ``OUT/report.md``/``.tex``/``.png``/``.pdf``
show accuracy per method against difficulty.
"""

from __future__ import annotations

import dataclasses
import json
import time
import tomllib
import traceback
from pathlib import Path
from typing import Any

import efficient_attn as ea
from efficient_attn.train import TrainConfig, train

_TASK_FIELDS = ("task", "seq_len", "vocab_size", "num_pairs", "distance", "num_queries")


@dataclasses.dataclass(frozen=True)
class Run:
    task: str
    axis: str  # the difficulty field varied in this grid
    value: int
    method: str
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"{self.task}-{self.axis}{self.value}-{self.method}"


def load_preset(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        candidates = sorted(p.stem for p in Path("experiments").glob("quality*.toml"))
        raise ValueError(f"no quality preset {str(path)!r}; presets: {candidates}")
    return tomllib.loads(path.read_text())


def expand(preset: dict[str, Any], methods: list[str] | None = None) -> list[Run]:
    """All (grid point, method) runs of a preset."""
    names = methods or preset.get("methods", "all")
    if names == "all":
        names = [m for m in ea.methods() if ea.get_method(m).available() is None]
    for m in names:
        ea.get_method(m)
    train_kw = dict(preset.get("train", {}))
    options = preset.get("options", {})
    runs = []
    for grid in preset.get("grid", []):
        swept = [k for k, v in grid.items() if isinstance(v, list)]
        if len(swept) != 1 or swept[0] not in _TASK_FIELDS:
            raise ValueError(f"each [[grid]] needs exactly one list-valued task field; got {grid}")
        axis = swept[0]
        for value in grid[axis]:
            fields = {**grid, axis: value}
            for method in names:
                kw = {**train_kw, **fields, "method": method, "options": options.get(method, {})}
                config = TrainConfig.for_task(kw.pop("task"), **kw)  # seq2seq task defaults
                runs.append(Run(grid["task"], axis, int(value), method, config))
    return runs


def run_grid(
    preset: dict[str, Any], out: str | Path, *, methods: list[str] | None = None, log=print
) -> list[dict[str, Any]]:
    """Train every run not finished yet; append rows to ``out/results.jsonl``."""
    out = Path(out)
    runs = expand(preset, methods)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {r["name"] for r in read_rows(results)}
    start = time.perf_counter()
    for i, run in enumerate(runs):
        if run.name in done:
            continue
        run_dir = out / "runs" / run.name
        row = {"name": run.name, "task": run.task, "axis": run.axis, "value": run.value}
        row.update(method=run.method, options=run.config.options, steps=run.config.steps)
        t0 = time.perf_counter()
        try:
            resume = (run_dir / "config.json").exists()
            final = train(run.config, run_dir, resume=resume, progress=False)
            row.update(status="ok", accuracy=final["accuracy"], eval_loss=final["eval_loss"])
        except Exception as e:  # a failing run is a row, the grid goes on
            row.update(status="error", message=f"{type(e).__name__}: {e}", accuracy=None)
            (run_dir / "error.txt").write_text(traceback.format_exc())
        row["wall_s"] = time.perf_counter() - t0
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        elapsed = time.perf_counter() - start
        log(
            f"[{i + 1}/{len(runs)}] {run.name}: {row['status']} "
            f"acc={row['accuracy'] if row['accuracy'] is None else round(row['accuracy'], 3)} "
            f"({row['wall_s']:.0f} s, {elapsed / 60:.1f} min elapsed)"
        )
    return read_rows(results)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # torn last line of a killed run
    return rows


def _tables(rows: list[dict[str, Any]]):
    """{(task, axis): (values, {method: {value: accuracy}})}."""
    tables: dict[tuple[str, str], tuple[list[int], dict[str, dict[int, float | None]]]] = {}
    for r in rows:
        values, acc = tables.setdefault((r["task"], r["axis"]), ([], {}))
        if r["value"] not in values:
            values.append(r["value"])
        acc.setdefault(r["method"], {})[r["value"]] = r.get("accuracy")
    for values, _ in tables.values():
        values.sort()
    return tables


def _fmt(x: float | None) -> str:
    return "error" if x is None else f"{x:.3f}"


def write_report(out: str | Path, preset: dict[str, Any] | None = None) -> Path:
    """``report.md``, ``report.tex`` and ``accuracy.png``/``.pdf`` from ``results.jsonl``."""
    out = Path(out)
    rows = read_rows(out / "results.jsonl")
    tables = _tables(rows)
    md = ["# Quality: held-out accuracy per method and difficulty", ""]
    if preset and preset.get("description"):
        md += [preset["description"], ""]
    tex = []
    for (task, axis), (values, acc) in tables.items():
        md += [f"## {task} (difficulty: {axis})", ""]
        md.append("| method | " + " | ".join(f"{axis}={v}" for v in values) + " |")
        md.append("|---|" + "---:|" * len(values))
        tex += [
            f"% {task}: held-out accuracy vs {axis}",
            "\\begin{tabular}{l" + "r" * len(values) + "}",
            "\\toprule",
            "method & " + " & ".join(f"{axis.replace('_', ' ')}={v}" for v in values) + " \\\\",
            "\\midrule",
        ]
        for method, by_value in acc.items():
            cells = [_fmt(by_value.get(v)) if v in by_value else "-" for v in values]
            md.append(f"| {method} | " + " | ".join(cells) + " |")
            tex.append(method.replace("_", "\\_") + " & " + " & ".join(cells) + " \\\\")
        md.append("")
        tex += ["\\bottomrule", "\\end{tabular}", ""]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.tex").write_text("\n".join(tex) + "\n")
    _plot(out, tables)
    return out / "report.md"


def _plot(out: Path, tables) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(tables), 1)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    for ax, ((task, axis), (values, acc)) in zip(axes[0], tables.items(), strict=False):
        for method, by_value in acc.items():
            xs = [v for v in values if by_value.get(v) is not None]
            ax.plot(xs, [by_value[v] for v in xs], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"accuracy.{ext}", dpi=150)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("preset", nargs="?", default="experiments/quality.toml")
    p.add_argument("--methods", default=None, help="comma-separated (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--report-only", action="store_true")


def run(args) -> int:
    """``efficient-attn quality``: train the grid (resumable), then write the report."""
    preset = load_preset(args.preset)
    if args.steps is not None:
        preset.setdefault("train", {})["steps"] = args.steps
    if not args.report_only:
        methods = args.methods.split(",") if args.methods else None
        run_grid(preset, args.out, methods=methods)
    path = write_report(args.out, preset)
    print(path.read_text())
    return 0
