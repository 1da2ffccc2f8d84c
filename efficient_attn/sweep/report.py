"""Reports of sweep results: markdown, LaTeX (booktabs) tables and log-log plots.

Rows are grouped into panels (pass, dtype, mask, batch, heads, kv_heads,
head_dim, sequence-parallel strategy); in each panel a table row is a method
with its options (and its device count, for sequence-parallel points) and a
column is a sequence length. Scaling exponents are least-squares slopes of
``log(value)`` on ``log(seq_len)`` over the longest :data:`FIT_POINTS` lengths
a method ran at (short lengths are dominated by fixed overheads). A crossover
is the length from which a method stays faster (smaller) than a baseline,
interpolated in log-log between the two lengths that bracket it; a baseline
that ran out of memory counts as infinitely slow and large.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from efficient_attn.sweep.results import (  # noqa: F401  (re-exported: the data model)
    BASELINES,
    ERROR,
    MEMORY,
    MOD_METRICS,
    THROUGHPUT,
    TIME,
    Metric,
    Panel,
    PanelData,
    group,
    memory_mib,
    merge_rows,
    rel_error,
    sweep_meta,
    time_ms,
    variant,
)

FIT_POINTS = 3
_MARK = {"oom": "OOM", "error": "error", "unsupported": "n/a"}
_INF = math.inf


def fit_exponent(values: dict[int, float], points: int = FIT_POINTS) -> float | None:
    """Least-squares slope of log(value) on log(length) over the longest ``points`` lengths."""
    finite = sorted((t, v) for t, v in values.items() if 0 < v < _INF)[-points:]
    if len({t for t, _ in finite}) < 2:
        return None
    xs = [math.log(t) for t, _ in finite]
    ys = [math.log(v) for _, v in finite]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def crossover(method: dict[int, float], base: dict[int, float]) -> str:
    """Length from which ``method`` stays below ``base`` (``inf`` marks a failed point)."""
    common = [t for t in sorted(method) if t in base and method[t] < _INF]
    if not common:
        return "–"
    wins = [method[t] < base[t] for t in common]
    if all(wins):
        return f"≤ {common[0]:,}"
    if not wins[-1]:
        return f"> {common[-1]:,}"
    i = max(j for j, w in enumerate(wins) if not w)
    lo, hi = common[i], common[i + 1]
    if base[hi] == _INF or method[hi] <= 0 or method[lo] <= 0:
        return f"{lo:,}–{hi:,}"
    r_lo, r_hi = (math.log(method[t] / base[t]) for t in (lo, hi))
    frac = r_lo / (r_lo - r_hi) if r_lo != r_hi else 0.5
    return f"≈ {math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo))):,.0f}"


def fmt_value(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _cell(row: dict[str, Any] | None, metric: Callable, fmt: Callable[[float], str]) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return _MARK.get(row["status"], row["status"])
    value = metric(row)
    return "n/c" if value is None else fmt(value)


def _error_cell(row: dict[str, Any] | None) -> str:
    text = _cell(row, rel_error, lambda v: f"{v:.1e}")
    if row is not None and row["status"] == "ok" and row.get("grad_rel_error") is not None:
        text += f" / {row['grad_rel_error']:.1e}"
    return text


def table(data: PanelData, metric: Metric) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one metric: methods x lengths, plus the fitted exponent."""
    header = ["method", *(f"{t:,}" for t in data.lengths)]
    if metric.fit:
        header.append("exponent")
    rows = []
    for name in data.variants:
        if metric is ERROR:
            cells = [_error_cell(data.cells.get((name, t))) for t in data.lengths]
        else:
            cells = [
                _cell(data.cells.get((name, t)), metric.value, fmt_value) for t in data.lengths
            ]
        if not any(cells) or all(c == "n/a" for c in cells if c):
            continue
        if metric.optional and all(c in ("", "n/a", "n/c") for c in cells):
            continue
        if metric.fit:
            slope = fit_exponent(data.values(name, metric.value))
            cells.append("–" if slope is None else f"{slope:.2f}")
        rows.append([name, *cells])
    return header, rows


def crossover_table(data: PanelData) -> tuple[list[str], list[list[str]]]:
    bases = [b for b in BASELINES if b in data.variants]
    header = ["method"]
    for b in bases:
        header += [f"faster than {b} from N", f"smaller than {b} from N"]
    rows = []
    for name in data.variants:
        if name in bases or not bases:
            continue
        cells = []
        for b in bases:
            for m in (TIME, MEMORY):
                cells.append(crossover(data.values(name, m.value), data.values(b, m.value)))
        if any(c != "–" for c in cells):
            rows.append([name, *cells])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&")):
        text = text.replace(a, b)
    for a, b in (("#", r"\#"), ("≤", r"$\le$"), ("≈", r"$\approx$"), ("–", "--")):
        text = text.replace(a, b)
    return text


def _tex_cell(text: str) -> str:
    parts = []
    for part in text.split(" / "):
        mantissa, e, exponent = part.partition("e")
        if e and exponent.lstrip("+-").isdigit() and mantissa.replace(".", "").isdigit():
            parts.append(f"${mantissa}{{\\times}}10^{{{int(exponent)}}}$")
        else:
            parts.append(_tex_escape(part.replace(",", "{,}") if part[:1].isdigit() else part))
    return " / ".join(parts)


def latex_table(header, rows, caption: str, label: str) -> str:
    """A booktabs ``table`` environment, ready to ``\\input``."""
    spec = "l" + "r" * (len(header) - 1)
    lines = [
        "% generated by efficient-attn report; needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{_tex_escape(caption)}}}",
        f"\\label{{{label}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(_tex_escape(h) for h in header) + " \\\\",
        "\\midrule",
        *(" & ".join([_tex_escape(r[0]), *map(_tex_cell, r[1:])]) + " \\\\" for r in rows),
        "\\bottomrule",
        "\\end{tabular}",
        "\\end{table}",
        "",
    ]
    return "\n".join(lines)


def option_sweeps(data: PanelData) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(method, option) -> ok rows, for methods whose variants differ in one numeric option."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in data.cells.values():
        if row["status"] == "ok":
            by_method.setdefault(row["method"], []).append(row)
    found = {}
    for method, rows in by_method.items():
        opts = [r.get("resolved_options") or r.get("options") or {} for r in rows]
        keys = sorted(set().union(*opts))
        varying = [k for k in keys if len({json.dumps(o.get(k)) for o in opts}) > 1]
        if len(varying) != 1:
            continue
        values = [o.get(varying[0]) for o in opts]
        if all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in values):
            found[(method, varying[0])] = rows
    return found


def _environment_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    envs = [r["env"] for r in rows if r.get("env")]
    if not envs:
        return []

    def uniq(field: str) -> str:
        seen = Counter(str(e.get(field)) for e in envs)
        return ", ".join(v for v, _ in seen.most_common())

    devices = Counter(_device_name([{"env": e}]) for e in envs if e.get("platform"))
    dates = sorted(str(e.get("date")) for e in envs)
    loads = [e["load_avg_1m"] for e in envs if e.get("load_avg_1m") is not None]
    load = f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    return [
        f"- device: {', '.join(devices) or 'unknown'}; host: {uniq('host')}, "
        f"{uniq('cpu_count')} CPUs{load}",
        f"- jax {uniq('jax')}, jaxlib {uniq('jaxlib')}, flax {uniq('flax')}, "
        f"numpy {uniq('numpy')}, python {uniq('python')}",
        f"- git commit: {uniq('git_commit')}",
        f"- measured: {dates[0]} to {dates[-1]}",
    ]


def _device_name(rows: Sequence[dict[str, Any]]) -> str:
    for r in rows:
        env = r.get("env") or {}
        if env.get("platform"):
            kind, count, name = (
                env.get("device_kind"),
                env.get("device_count") or 1,
                env["platform"],
            )
            if kind not in (None, name):
                name = f"{name} {kind}"
            return name + (f" x{count}" if count > 1 else "")
    return "unknown device"


def _notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            where = f"{r['seq_len']} {r['pass']} {r['dtype']}"
            first = (str(r.get("message") or "").splitlines() or [""])[0][:300]
            groups.setdefault((variant(r), r["status"], first), []).append(where)
    lines = []
    for (name, status, message), where in groups.items():
        lines.append(f"- **{name}** {status} at {'; '.join(where)}: {message}")
    return lines


def header_lines(
    title: str, meta: dict[str, Any], rows: Sequence[dict[str, Any]], paths: Sequence[str | Path]
) -> list[str]:
    """A report's opening: title, description, note, point counts and environment."""
    statuses = Counter(r["status"] for r in rows)
    return [
        f"# {title}",
        "",
        *([str(meta["description"]).strip(), ""] if meta.get("description") else []),
        *([f"**Note.** {meta['note']}", ""] if meta.get("note") else []),
        f"{len(rows)} points from {', '.join(map(str, paths))}: "
        + ", ".join(f"{n} {s}" for s, n in statuses.most_common())
        + ".",
        "",
        *_environment_lines(rows),
        "",
    ]


def write_report(
    paths: Sequence[str | Path], out_dir: str | Path | None = None, *, panels: bool = False
) -> list[Path]:
    """Merge the results under ``paths`` and write report.md, .tex tables and plots.

    ``panels``: also draw each plotted metric with a panel per method family
    (``METRIC-families-PANEL.png``; dense and xla repeated in every panel).
    """
    rows = merge_rows(paths)
    if not rows:
        raise ValueError(f"no result rows in {', '.join(map(str, paths))}")
    out = Path(out_dir if out_dir is not None else paths[0])
    if out.suffix == ".jsonl":
        out = out.parent
    (out / "tables").mkdir(parents=True, exist_ok=True)
    meta, device = sweep_meta(paths), _device_name(rows)
    try:
        from efficient_attn.sweep import plots
    except ImportError:  # matplotlib is the optional [plot] dependency
        plots = None
    md = [
        *header_lines(f"Attention sweep: {meta.get('name', out.name)}", meta, rows, paths),
        "Time: median over repeats of the compiled call after warm-up (ms); plots show "
        "min-max bars. Memory: XLA's compiled temp + argument + output bytes (MiB). "
        "Error: relative Frobenius error of the output vs float64 exact attention "
        "(fwd+bwd: output / worst of dq, dk, dv); n/c: not computed (reference too large). "
        f"Exponent: log-log slope over the {FIT_POINTS} longest lengths. OOM: out of memory; "
        "n/a: unsupported here."
        + (
            " Time n/c: compiled only, not run (B*N*T^2 above the preset's time_max_elements)."
            if any(r.get("time_note") for r in rows)
            else ""
        ),
        *(
            []
            if plots
            else ["", "(No plots: matplotlib is not installed; pip install matplotlib.)"]
        ),
    ]
    written, tex = [], []
    for data in group(rows):
        slug, title = data.panel.slug, data.panel.title
        md += ["", f"## {title}", ""]
        for metric in (TIME, THROUGHPUT, MEMORY, ERROR, *MOD_METRICS):
            header, body = table(data, metric)
            if not body:
                continue
            stem = out / f"{metric.name}-{slug}"
            figure = (
                plots.metric_plot(data, metric, stem, device)
                if plots and not metric.optional
                else []
            )
            if figure and panels:
                by_family = out / f"{metric.name}-families-{slug}"
                figure += plots.family_panels_plot(data, metric, by_family, device)
            written += figure
            for f in (f for f in figure if f.suffix == ".png"):
                md += [f"![{metric.name}]({f.name})", ""]
            per_device = data.panel.strategy and metric is MEMORY
            name = metric.caption + (" per device" if per_device else "")
            md += [f"**{name}** ({metric.unit})", "", markdown_table(header, body), ""]
            caption = f"{name} ({metric.unit}) vs sequence length; {title}; {device}."
            label = f"tab:{metric.name}-{slug}"
            t = latex_table(header, body, caption, label)
            path = out / "tables" / f"{metric.name}-{slug}.tex"
            path.write_text(t)
            written.append(path)
            tex.append(t)
        header, body = crossover_table(data)
        if body:
            md += ["**Crossover lengths**", "", markdown_table(header, body), ""]
        for (method, option), opt_rows in option_sweeps(data).items() if plots else ():
            stem = out / f"option-{method}-{option}-{slug}"
            figure = plots.option_plot(method, option, opt_rows, stem, title, device)
            written += figure
            md += [
                f"**{method}: error and time vs {option}**",
                "",
                f"![{option}]({figure[0].name})",
            ]
            md.append("")
    notes = _notes(rows)
    if notes:
        md += ["", "## Points that did not run", "", *notes]
    (out / "report.md").write_text("\n".join(md).rstrip() + "\n")
    (out / "report.tex").write_text("\n".join(tex))
    return [out / "report.md", out / "report.tex", *written]


def headline(paths: Sequence[str | Path]) -> str:
    """The time table of every panel (and memory per device where sequence parallel)."""
    parts = []
    for data in group(merge_rows(paths)):
        metrics = [(TIME, "time (ms)")]
        if data.panel.strategy:
            metrics.append((MEMORY, "memory per device (MiB)"))
        for metric, what in metrics:
            header, body = table(data, metric)
            if body:
                parts += [f"{data.panel.title}: {what}", markdown_table(header, body), ""]
    return "\n".join(parts)
