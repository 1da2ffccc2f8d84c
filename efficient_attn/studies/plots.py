"""Figures of the studies (PNG and PDF), with matplotlib's object API (no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from efficient_attn.sweep.styles import family_legend, styles

_COLORS = matplotlib.colormaps["tab10"].colors
_MARKERS = "osD^v<>pPhX*"


def _tokens(t: int) -> str:
    return f"{t // 1024}K" if t >= 1024 and t % 1024 == 0 else str(t)


def _save(fig: Figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=150)
    return paths


def scale_plot(rows: Sequence[dict[str, Any]], stem: Path, where: str) -> list[Path]:
    """Max weight, entropy and gradient norm vs head_dim, one line per scale rule."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    fig = Figure(figsize=(11.0, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    rules = list(dict.fromkeys(r["scale_rule"] for r in ok))
    dims = sorted({r["head_dim"] for r in ok})
    panels = (
        ("max_weight", "mean max attention weight", "linear"),
        ("entropy", "mean softmax entropy (nats)", "linear"),
        ("grad_norm", "mean per-query |dL/dq|", "log"),
    )
    for ax, (field, label, yscale) in zip(axes, panels, strict=True):
        for i, rule in enumerate(rules):
            at = sorted(
                (r["head_dim"], r[field], r[f"{field}_std"]) for r in ok if r["scale_rule"] == rule
            )
            xs, ys, err = zip(*at, strict=True)
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                marker=_MARKERS[i],
                color=_COLORS[i],
                label=f"scale {rule}",
                capsize=2,
                ms=5,
            )
        if field == "entropy":
            uniform = sorted({r["entropy_uniform"] for r in ok})
            for u in uniform:
                ax.axhline(
                    u,
                    color="k",
                    ls="--",
                    lw=0.8,
                    label="uniform (log T)" if u == uniform[0] else None,
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.minorticks_off()
        ax.set_yscale(yscale)
        ax.set_xlabel("head dim d")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(
        f"Softmax statistics of random unit-variance q, k under three scale rules ({where})",
        fontsize=9,
    )
    return _save(fig, stem)


def training_plot(rows: Sequence[dict[str, Any]], stem: Path, where: str) -> list[Path]:
    """Held-out accuracy vs training step, one line per (scale rule, head_dim, seed)."""
    ok = [r for r in rows if r["status"] == "ok" and r["curve"]]
    if not ok:
        return []
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    rules = list(dict.fromkeys(r["scale_rule"] for r in ok))
    styles = ("-", "--", ":", "-.")
    for r in ok:
        i = rules.index(r["scale_rule"])
        steps, accs = zip(*r["curve"], strict=True)
        ax.plot(
            steps,
            accs,
            marker=_MARKERS[i],
            color=_COLORS[i],
            ls=styles[r["seed"] % len(styles)],
            ms=4,
            label=f"scale {r['scale_rule']} (d={r['head_dim']}, seed {r['seed']})",
        )
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Trainability under each scale rule ({where})", fontsize=9)
    return _save(fig, stem)


def decode_plot(rows: Sequence[dict[str, Any]], stem: Path, title: str) -> list[Path]:
    """Time per token and cache bytes vs context (log-log), one line per method x K/V heads."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    fig = Figure(figsize=(12.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    methods = styles({r["method"]: r["method"] for r in ok})  # colour, marker: by family
    kv = sorted({r["kv_heads"] for r in ok}, reverse=True)
    dashes = ("-", "--", ":", "-.")  # by K/V heads
    lengths = sorted({r["seq_len"] for r in ok})
    lines: dict[tuple, list[dict]] = {}
    for r in sorted(ok, key=lambda r: list(methods).index(r["method"])):
        lines.setdefault((r["method"], r["kv_heads"], r["attention"]), []).append(r)
    entries = []
    for (method, k, kind), line in lines.items():
        line.sort(key=lambda r: r["seq_len"])
        m = methods[method]
        style = dict(color=m.color, ls=dashes[kv.index(k) % len(dashes)], marker=m.marker, ms=4)
        xs = [r["seq_len"] for r in line]
        label = f"{method} K={k} ({kind})"
        (handle,) = axes[0].plot(xs, [r["time_ms"] for r in line], label=label, **style)
        axes[1].plot(xs, [r["cache_bytes"] / 2**20 for r in line], **style)
        entries.append((handle, label, m.family))
    for ax, label in zip(axes, ("time per token (ms, median)", "cache / state (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [_tokens(t) for t in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
    ncols = 1 if len(entries) <= 20 else 2
    family_legend(fig, entries, fontsize=7, ncols=ncols, loc="outside right upper")
    fig.suptitle(f"Decoding one token against a KV cache ({title})", fontsize=9)
    return _save(fig, stem)


def zoology_plot(best: dict, stem: Path, source: str) -> list[Path]:
    """Zoology Figure 2's layout: a panel per sequence length, accuracy vs d_model per method.

    ``best``: (seq_len, pairs, method, d_model) -> accuracy (or a status string: not drawn).
    """
    panels = sorted({k[:2] for k in best})
    if not panels:
        return []
    methods = styles({k[2]: k[2] for k in best})  # colour, marker, dash: by family
    if len({k[3] for k in best}) == 1:  # one width: accuracy against the cells instead
        return _zoology_cells(best, panels, methods, stem, source)
    fig = Figure(figsize=(3.2 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    entries = {}
    for ax, (t, p) in zip(axes, panels, strict=True):
        for m, style in methods.items():
            pts = sorted(
                (d, v)
                for (tt, pp, mm, d), v in best.items()
                if (tt, pp, mm) == (t, p, m) and isinstance(v, float)
            )
            if pts:
                (handle,) = ax.plot(*zip(*pts, strict=True), **style.kwargs(), ms=4, label=m)
                entries.setdefault(m, (handle, m, style.family))
        widths = sorted({k[3] for k in best if k[:2] == (t, p)})
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(d) for d in widths])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"Sequence length {t} ({p} pairs)", fontsize=9)
        ax.set_xlabel("model dimension")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MQAR accuracy")
    family_legend(axes[-1], list(entries.values()), fontsize=7, loc="lower right")
    fig.suptitle(f"MQAR accuracy vs width, Zoology's layout ({source.split(',')[0]})", fontsize=9)
    return _save(fig, stem)


def _zoology_cells(best: dict, panels: list, methods: dict, stem: Path, source: str) -> list[Path]:
    """One width: MQAR accuracy against the (sequence, pairs) cells, one line per method."""
    (d,) = {k[3] for k in best}
    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.subplots()
    entries = []
    for m, style in methods.items():
        pts = [(i, v) for i, (t, p) in enumerate(panels)
               if isinstance(v := best.get((t, p, m, d)), float)]  # fmt: skip
        if pts:
            (handle,) = ax.plot(*zip(*pts, strict=True), **style.kwargs(), ms=4, label=m)
            entries.append((handle, m, style.family))
    ax.set_xticks(range(len(panels)), [f"{t}\n({p} pairs)" for t, p in panels])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length (key-value pairs)")
    ax.set_ylabel("MQAR accuracy (best LR)")
    ax.grid(alpha=0.3)
    family_legend(fig, entries, fontsize=7, loc="outside right upper")
    ax.set_title(f"MQAR at d_model {d} ({source.split(',')[0]})", fontsize=9)
    return _save(fig, stem)
