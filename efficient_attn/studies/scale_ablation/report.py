"""The scale ablation's report: random-input and trained tables, summary and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from efficient_attn.studies.scale_ablation.points import RULES
from efficient_attn.sweep import report as sweep_report


def describe(row: dict[str, Any]) -> str:
    if row["kind"] == "trained":
        return f"accuracy {row['accuracy']:.3f}, first >= 0.9 at step {row['steps_to_90']}"
    return (
        f"max weight {row['max_weight']:.3g}, entropy {row['entropy']:.3g} nats, "
        f"grad norm {row['grad_norm']:.3g}"
    )


def _ok(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok" and r["kind"] == kind]


def summary(rows: list[dict[str, Any]]) -> str:
    """How each rule's statistics move with head_dim, and the trained accuracies."""
    parts = []
    random = _ok(rows, "random")
    by_rule: dict[str, dict[int, dict]] = {}
    for r in random:
        by_rule.setdefault(r["scale_rule"], {})[r["head_dim"]] = r
    if by_rule:
        dims = sorted({h for d in by_rule.values() for h in d})
        spread = {}
        texts = []
        for rule, at in by_rule.items():
            lo, hi = at[min(at)], at[max(at)]
            spread[rule] = max(r["entropy"] for r in at.values()) - min(
                r["entropy"] for r in at.values()
            )
            texts.append(
                f"{rule}: max weight {lo['max_weight']:.3g} -> {hi['max_weight']:.3g}, "
                f"entropy {lo['entropy']:.3g} -> {hi['entropy']:.3g} nats, "
                f"grad norm {lo['grad_norm']:.3g} -> {hi['grad_norm']:.3g}"
            )
        text = (
            f"Random unit-variance q, k from head_dim {dims[0]} to {dims[-1]} (T = "
            f"{random[0]['seq_len']}, uniform entropy log T = {random[0]['entropy_uniform']:.2f} "
            "nats): " + "; ".join(texts) + "."
        )
        if len(spread) > 1 and len(dims) > 1:
            steady = min(spread, key=spread.get)
            others = ", ".join(f"{r} {s:.2f}" for r, s in spread.items() if r != steady)
            text += (
                f" {steady} keeps the entropy steadiest across head dims (spread "
                f"{spread[steady]:.2f} nats; {others})."
            )
        parts.append(text)
    trained = _ok(rows, "trained")
    if trained:
        groups: dict[tuple[str, int], list[dict]] = {}
        for r in trained:
            groups.setdefault((r["scale_rule"], r["head_dim"]), []).append(r)
        texts = []
        for (rule, h), runs in groups.items():
            acc = sum(r["accuracy"] for r in runs) / len(runs)
            reached = [r["steps_to_90"] for r in runs]
            when = ", ".join("never" if s is None else str(s) for s in reached)
            texts.append(f"{rule} (head_dim {h}) {acc:.3f}, >= 0.9 first at step {when}")
        steps = sorted({r["steps"] for r in trained})
        seeds = len({r["seed"] for r in trained})
        parts.append(
            f"Trained {trained[0]['task']} ({'/'.join(map(str, steps))} steps, {seeds} seed"
            f"{'s' if seeds > 1 else ''} per rule): held-out accuracy " + "; ".join(texts) + "."
        )
    return " ".join(parts) or "No point ran."


def _mark(row: dict[str, Any]) -> str:
    return {"oom": "OOM", "unsupported": "n/a"}.get(row["status"], row["status"])


def _random_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "scale rule",
        "head dim",
        "scale",
        "logit std",
        "max weight",
        "entropy (nats)",
        "log T",
        "grad norm",
    ]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["scale_rule"], str(r["head_dim"]), f"{r['scale']:.4g}", _mark(r)])
            body[-1] += [""] * (len(header) - 4)
            continue
        body.append(
            [
                r["scale_rule"],
                str(r["head_dim"]),
                f"{r['scale']:.4g}",
                f"{r['logit_std']:.3g}",
                f"{r['max_weight']:.3f} ± {r['max_weight_std']:.3f}",
                f"{r['entropy']:.3f} ± {r['entropy_std']:.3f}",
                f"{r['entropy_uniform']:.3f}",
                f"{r['grad_norm']:.3g} ± {r['grad_norm_std']:.2g}",
            ]
        )
    return header, body


def _trained_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "scale rule",
        "head dim",
        "scale",
        "seed",
        "steps",
        "held-out accuracy",
        "first step >= 0.9",
        "accuracy curve (step:acc)",
        "max weight (last layer)",
        "entropy (last layer)",
    ]
    body = []
    for r in rows:
        head = [r["scale_rule"], str(r["head_dim"]), f"{r['scale']:.4g}", str(r["seed"])]
        if r["status"] != "ok":
            body.append([*head, _mark(r), *[""] * (len(header) - 5)])
            continue
        curve = " ".join(f"{s}:{a:.2f}" for s, a in r["curve"])
        body.append(
            [
                *head,
                str(r["steps"]),
                f"{r['accuracy']:.3f}",
                "never" if r["steps_to_90"] is None else str(r["steps_to_90"]),
                curve,
                f"{r['max_weight']:.3f}",
                f"{r['entropy']:.3f}",
            ]
        )
    return header, body


def report(rows: list[dict[str, Any]], out: Path) -> tuple[list[str], list[str], list[Path]]:
    """Tables of the random-input statistics and the trained runs, and their plots."""
    try:
        from efficient_attn.studies import plots
    except ImportError:
        plots = None
    md = [
        "Random rows: dense softmax attention, non-causal, on standard normal q, k, v "
        "[B, T, N, d]; mean ± std over draws. max weight: max over keys of a softmax row, "
        "averaged over rows; entropy: of a softmax row (nats), averaged; grad norm: per-query "
        "L2 norm of d sum(out * dout) / dq with fixed standard normal dout, averaged; logit "
        "std: of scale * q·k. Trained rows: held-out accuracy of a model trained with that "
        "scale; max weight / entropy of its last layer at the scored positions of a held-out "
        "batch.",
        "",
        f"**What it shows.** {summary(rows)}",
    ]
    tex, files = [], []
    random = [r for r in rows if r["kind"] == "random"]
    trained = [r for r in rows if r["kind"] == "trained"]
    order = {rule: i for i, rule in enumerate(RULES)}
    random.sort(key=lambda r: (order.get(r["scale_rule"], 99), r["head_dim"]))
    trained.sort(key=lambda r: (order.get(r["scale_rule"], 99), r["head_dim"], r["seed"]))
    for title, part, make, plot in (
        ("Random inputs", random, _random_table, plots and plots.scale_plot),
        ("Trained models", trained, _trained_table, plots and plots.training_plot),
    ):
        if not part:
            continue
        shapes = sorted({(r["seq_len"], r["batch"], r["heads"]) for r in part})
        where = "; ".join(f"T={t}, B={b}, N={n}" for t, b, n in shapes)
        if part is trained:
            where = f"{part[0]['task']}, " + where.replace("B=", "batch size ")
        md += ["", f"## {title} ({where})", ""]
        if plot:
            figure = plot(part, out / f"scale_ablation-{title.split()[0].lower()}", where)
            files += figure
            md += [f"![{title}]({figure[0].name})", ""] if figure else []
        header, body = make(part)
        md += [sweep_report.markdown_table(header, body), ""]
        caption = f"Scale ablation, {title.lower()} ({where})."
        label = f"tab:scale-ablation-{title.split()[0].lower()}"
        tex.append(sweep_report.latex_table(header, body, caption, label).replace("±", r"$\pm$"))
    return md, tex, files
