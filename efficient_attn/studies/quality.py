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
checkpoint, so re-running the command continues the grid (the loop is the
sweeps' :func:`efficient_attn.sweep.harness.run_points`, run in this process).
``OUT/results.jsonl`` collects one row per run (keyed by its name, appended
with ``fsync``) and ``OUT/report.md``/``.tex``/``.png``/``.pdf``
show accuracy per method against difficulty.
"""

from __future__ import annotations

import dataclasses
import time
import tomllib
import traceback
from pathlib import Path
from typing import Any

import efficient_attn as ea
from efficient_attn.studies.base import throughput_note
from efficient_attn.sweep import harness, results
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


def _row(run: Run, status: str, message: str = "") -> dict[str, Any]:
    row = {"key": run.name, "name": run.name, "task": run.task, "axis": run.axis}
    row.update(value=run.value, method=run.method, options=run.config.options)
    row.update(steps=run.config.steps, status=status, message=message, accuracy=None)
    return row


def _train(run: Run, run_dir: Path) -> dict[str, Any]:
    """Train one run in this process (resuming its checkpoint); a failure is an error row."""
    row = _row(run, "ok")
    t0 = time.perf_counter()
    try:
        resume = (run_dir / "config.json").exists()
        final = train(run.config, run_dir, resume=resume, progress=False)
        row.update(accuracy=final["accuracy"], eval_loss=final["eval_loss"])
        row.update(tokens_per_s=final.get("tokens_per_s"))
        row.update(flop_utilisation=final.get("flop_utilisation"))
        row.update(matmul_flop_s=final.get("matmul_flop_s"))
    except Exception as e:  # a failing run is a row, the grid goes on
        row.update(status="error", message=f"{type(e).__name__}: {e}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
    row["wall_s"] = time.perf_counter() - t0
    return row


def run_grid(
    preset: dict[str, Any], out: str | Path, *, methods: list[str] | None = None, log=print
) -> list[dict[str, Any]]:
    """Train every run not finished yet (:func:`efficient_attn.sweep.harness.run_points`,
    in this process); rows go to ``out/results.jsonl``, appended with ``fsync``."""
    out = Path(out)
    runs = {run.name: run for run in expand(preset, methods)}
    (out / "runs").mkdir(parents=True, exist_ok=True)
    points = [{"key": name, "label": name} for name in runs]

    class _Log:  # the harness writes progress lines; ``log`` receives them
        def write(self, text: str) -> None:
            for line in text.splitlines():
                if line.strip():
                    log(line)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    executor = harness.Executor(
        execute=lambda p: _train(runs[p["key"]], out / "runs" / p["key"]),
        new_row=lambda p, status, message: _row(runs[p["key"]], status, message),
        describe=lambda r: f"acc={r['accuracy']:.3f} ({r['wall_s']:.0f} s)",
    )
    harness.run_points(points, out, executor, name="quality grid", stream=_Log())
    return read_rows(out / "results.jsonl")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The grid's rows (the latest per run; a torn last line of a killed run is skipped)."""
    return list({r["key"]: r for r in results.read_rows(path)}.values())


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
    note = throughput_note(rows)
    if note:
        md += [note, ""]
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

    from efficient_attn.sweep.styles import family_legend, styles

    n = max(len(tables), 1)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    methods = styles({m: m for _, acc in tables.values() for m in acc})  # colour by family
    entries = {}
    for ax, ((task, axis), (values, acc)) in zip(axes[0], tables.items(), strict=False):
        for method, by_value in acc.items():
            xs = [v for v in values if by_value.get(v) is not None]
            style = methods[method]
            (line,) = ax.plot(xs, [by_value[v] for v in xs], **style.kwargs(), label=method)
            entries.setdefault(method, (line, method, style.family))
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    ordered = [entries[m] for m in methods if m in entries]
    family_legend(axes[0][-1], ordered, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ext in ("png", "pdf"):
        fig.savefig(out / f"accuracy.{ext}", dpi=150, bbox_inches="tight")
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
