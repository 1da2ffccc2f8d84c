"""The sqrt(d) scaling ablation: softmax statistics and trainability under three scale rules.

Rules (logit scale as a function of the head dim d): ``1/sqrt(d)`` (the
Transformer's), ``1`` and ``1/d``.

``kind = "random"`` rows: q, k, v and a cotangent ``dout``, all
``[B, T, N, d]`` with standard normal entries (so ``q·k`` has variance d),
over ``seeds`` draws (averaged; ``*_std`` fields are the spread across draws).
Non-causal dense softmax attention with ``scale = rule(d)``:

* ``max_weight``: max over keys of each softmax row, averaged over rows;
* ``entropy``: softmax row entropy in nats, averaged over rows
  (``entropy_uniform = log T`` is the maximum);
* ``grad_norm``: the gradient of ``loss = sum(out * dout)`` with respect to q,
  as the L2 norm over d of each query's gradient ``dq[b, t, n, :]``, averaged
  over (b, t, n);
* ``logit_std``: standard deviation of the logits ``scale * q·k``
  (``scale * sqrt(d)`` in expectation).

``kind = "trained"`` rows: a :class:`efficient_attn.nn.DecoderLM` trained on
MQAR with :func:`efficient_attn.train.train` under ``scale = rule(d)``, with
``d_model = num_heads * d`` (the ``[train]`` table sets the other
:class:`efficient_attn.train.TrainConfig` fields). Runs live in
``OUT/runs/<rule>-h<d>-seed<s>-<digest>/`` and resume if killed. Fields:
held-out ``accuracy`` and ``eval_loss`` at the end, the held-out accuracy
``curve`` (``[step, accuracy]`` at every evaluation) and ``steps_to_90`` (the
first evaluated step with accuracy >= 0.9, None if never), and the trained
model's attention on one held-out batch at the scored (query) positions:
``max_weight``/``entropy`` of its last layer (``*_layers``: every layer).
``grad_norm`` is None for trained rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficient_attn.studies.base import Study
from efficient_attn.sweep import report as sweep_report
from efficient_attn.sweep.spec import int_list

if TYPE_CHECKING:
    from efficient_attn.train import TrainConfig

#: rule name -> (directory slug, head_dim -> scale)
RULES: dict[str, tuple[str, Callable[[int], float]]] = {
    "1/sqrt(d)": ("inv_sqrt_d", lambda d: 1.0 / math.sqrt(d)),
    "1": ("one", lambda d: 1.0),
    "1/d": ("inv_d", lambda d: 1.0 / d),
}
SETTINGS: dict[str, Any] = {
    "rules": list(RULES),
    "head_dim": [16, 64, 256],
    "seq_lens": [256],
    "batch": 2,
    "heads": 4,
    "seeds": 4,
    "seed": 0,
    "train_head_dim": [64],  # [] : no training
    "train_seeds": [0],
    "train": {},  # TrainConfig fields (task defaults to mqar)
}
FLAGS: dict[str, str] = {
    "seq_lens": "seq_lens",
    "batch": "batch",
    "heads": "heads",
    "head_dim": "head_dim",
}
MEASUREMENTS: tuple[str, ...] = (
    "max_weight",
    "max_weight_std",
    "entropy",
    "entropy_std",
    "entropy_uniform",
    "grad_norm",
    "grad_norm_std",
    "logit_std",
    "accuracy",
    "eval_loss",
    "steps",
    "steps_to_90",
    "curve",
    "train_wall_s",
    "max_weight_layers",
    "entropy_layers",
)
_DERIVED = ("scale", "d_model", "seed")  # TrainConfig fields the study sets


def rule_names(settings: Mapping[str, Any]) -> list[str]:
    """The preset's scale rules, checked against :data:`RULES`."""
    names = settings["rules"] if isinstance(settings["rules"], list) else [settings["rules"]]
    bad = [r for r in names if r not in RULES]
    if bad or not names:
        raise ValueError(f"rules={names!r}: valid rules are {', '.join(RULES)}")
    return names


def train_config(settings: Mapping[str, Any], rule: str, head_dim: int, seed: int) -> TrainConfig:
    """The :class:`TrainConfig` of one trained point (validated)."""
    from efficient_attn.train import TrainConfig

    table = dict(settings["train"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(table) - (fields - set(_DERIVED)))
    if bad:
        valid = ", ".join(sorted(fields - set(_DERIVED)))
        raise ValueError(
            f"[train] key(s) {bad} not allowed: scale, d_model (= num_heads * head_dim) and "
            f"seed (train_seeds) are set by the study; valid keys: {valid}"
        )
    table.setdefault("task", "mqar")
    heads = table.get("num_heads", TrainConfig.num_heads)
    config = TrainConfig(
        **table, scale=RULES[rule][1](head_dim), d_model=heads * head_dim, seed=seed
    )
    config.validate()
    return config


def points(settings: Mapping[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """Random-input points (rule x head_dim x length x batch x heads), then trained ones."""
    rules = rule_names(settings)
    seeds = int_list("seeds", settings["seeds"])[0]
    seed = int_list("seed", settings["seed"], minimum=0)[0]
    out = []
    for rule, h, t, b, n in itertools.product(
        rules,
        int_list("head_dim", settings["head_dim"]),
        int_list("seq_lens", settings["seq_lens"]),
        int_list("batch", settings["batch"]),
        int_list("heads", settings["heads"]),
    ):
        out.append(
            {
                "experiment": "scale_ablation",
                "key": f"scale_ablation|random|{rule}|H{h}|L{t}|B{b}|N{n}|seeds{seeds}|seed{seed}",
                "label": f"random {rule} head_dim={h}",
                "kind": "random",
                "scale_rule": rule,
                "scale": RULES[rule][1](h),
                "head_dim": h,
                "seq_len": t,
                "batch": b,
                "heads": n,
                "seeds": seeds,
                "seed": seed,
            }
        )
    train_dims = settings["train_head_dim"]
    for rule, h, s in itertools.product(
        rules,
        int_list("train_head_dim", train_dims) if train_dims != [] else [],
        int_list("train_seeds", settings["train_seeds"], minimum=0),
    ):
        config = dataclasses.asdict(train_config(settings, rule, h, s))
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
        run_dir = Path("runs") / f"{RULES[rule][0]}-h{h}-seed{s}-{digest}"
        out.append(
            {
                "experiment": "scale_ablation",
                "key": f"scale_ablation|trained|{rule}|H{h}|seed{s}|{digest}",
                "label": f"trained {rule} head_dim={h} seed={s} ({config['steps']} steps)",
                "kind": "trained",
                "scale_rule": rule,
                "scale": config["scale"],
                "head_dim": h,
                "seq_len": config["seq_len"],
                "batch": config["batch_size"],
                "heads": config["num_heads"],
                "seed": s,
                "task": config["task"],
                "run_dir": str(run_dir),
                "config": config,
                "run": {"run_dir": str(Path(out_dir).absolute() / run_dir)},
            }
        )
    return out


def _softmax_stats(weights, mask=None) -> tuple[Any, Any]:
    """(mean max weight, mean entropy in nats) of the rows of ``weights [B, N, Tq, Tk]``.

    ``mask [B, Tq]`` (optional) keeps only some query rows. Traceable.
    """
    import jax.numpy as jnp
    from jax.scipy.special import entr

    row_max, row_entropy = weights.max(-1), entr(weights).sum(-1)  # [B, N, Tq]
    if mask is None:
        return row_max.mean(), row_entropy.mean()
    keep = jnp.broadcast_to(mask[:, None, :], row_max.shape).astype(jnp.float32)
    count = jnp.maximum(keep.sum(), 1.0)
    return (row_max * keep).sum() / count, (row_entropy * keep).sum() / count


def attention_statistics(
    head_dim: int,
    scale: float,
    *,
    seq_len: int = 256,
    batch: int = 2,
    heads: int = 4,
    seeds: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Softmax statistics of dense attention on standard normal q, k, v ``[B, T, N, H]``.

    Returns the mean over ``seeds`` draws of ``max_weight``, ``entropy`` (nats),
    ``grad_norm`` (per-query L2 norm of ``d sum(out * dout) / dq``, averaged)
    and ``logit_std``, the spread across draws as ``*_std``, and
    ``entropy_uniform = log(seq_len)``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import efficient_attn as ea

    def loss(q, k, v, dout):
        return (ea.attention(q, k, v, method="dense", scale=scale) * dout).sum()

    @jax.jit
    def draw(q, k, v, dout):
        weights = ea.attention_weights(q, k, method="dense", scale=scale)  # [B, N, T, T]
        dq = jax.grad(loss)(q, k, v, dout)  # [B, T, N, H]
        logits = scale * jnp.einsum("btnh,bsnh->bnts", q, k)
        return jnp.stack(
            [*_softmax_stats(weights), jnp.linalg.norm(dq, axis=-1).mean(), logits.std()]
        )

    rng = np.random.default_rng(seed)
    shape = (4, batch, seq_len, heads, head_dim)  # q, k, v, dout
    values = np.asarray(
        [np.asarray(draw(*rng.standard_normal(shape, np.float32))) for _ in range(seeds)],
        np.float64,
    )  # [seeds, 4]
    mean, std = values.mean(0), values.std(0)
    return {
        "max_weight": float(mean[0]),
        "max_weight_std": float(std[0]),
        "entropy": float(mean[1]),
        "entropy_std": float(std[1]),
        "entropy_uniform": math.log(seq_len),
        "grad_norm": float(mean[2]),
        "grad_norm_std": float(std[2]),
        "logit_std": float(mean[3]),
    }


def trained_attention_statistics(
    config: TrainConfig, run_dir: Path
) -> tuple[list[float], list[float]]:
    """Per layer (max weights, entropies) of a trained run's attention on one held-out batch.

    Rows are the scored (query) positions of the batch, all heads; the
    parameters are the run's latest checkpoint.
    """
    import flax.linen as nn
    import jax
    import orbax.checkpoint as ocp

    from efficient_attn.nn.attention import MultiHeadAttention
    from efficient_attn.train import EVAL_SEED_OFFSET, Trainer

    trainer = Trainer(config, run_dir)
    manager = trainer.checkpoint_manager()
    try:
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    finally:
        manager.close()
    batch = trainer.batch(0, seed=config.seed + EVAL_SEED_OFFSET)

    @jax.jit
    def layer_stats(params, tokens, mask):
        weights = []

        def capture(next_fun, args, kwargs, context):
            if isinstance(context.module, MultiHeadAttention) and context.method_name == "__call__":
                weights.append(context.module.weights(*args, **kwargs))  # [B, N, T, T]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            trainer.model.apply(params, tokens)
        return [_softmax_stats(w, mask) for w in weights]

    stats = layer_stats(state["params"], batch.inputs, batch.mask)
    return [float(m) for m, _ in stats], [float(e) for _, e in stats]


def _measure_trained(payload: dict[str, Any], row: dict[str, Any]) -> None:
    from efficient_attn.train import TrainConfig, train

    config = TrainConfig(**payload["config"])
    run_dir = Path(payload["run"]["run_dir"])
    final = train(config, run_dir, resume=True, progress=False)
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    curve = [[r["step"], r["eval_accuracy"]] for r in logged if "eval_accuracy" in r]
    max_weights, entropies = trained_attention_statistics(config, run_dir)
    row.update(
        accuracy=final["accuracy"],
        eval_loss=final["eval_loss"],
        steps=final["step"],
        train_wall_s=final["train_wall_s"],
        curve=curve,
        steps_to_90=next((s for s, a in curve if a >= 0.9), None),
        max_weight=max_weights[-1],
        entropy=entropies[-1],
        max_weight_layers=max_weights,
        entropy_layers=entropies,
    )


def measure(payload: dict[str, Any], row: dict[str, Any]) -> None:
    """Fill a random-input row with softmax statistics, or train and evaluate a model."""
    if payload["kind"] == "trained":
        _measure_trained(payload, row)
        return
    stats = attention_statistics(
        payload["head_dim"],
        payload["scale"],
        seq_len=payload["seq_len"],
        batch=payload["batch"],
        heads=payload["heads"],
        seeds=payload["seeds"],
        seed=payload["seed"],
    )
    if not all(math.isfinite(v) for v in stats.values()):
        raise FloatingPointError(f"non-finite statistics: {stats}")
    row.update(stats)


def describe(row: dict[str, Any]) -> str:
    if row["kind"] == "trained":
        return f"accuracy {row['accuracy']:.3f}, first >= 0.9 at step {row['steps_to_90']}"
    return (
        f"max weight {row['max_weight']:.3g}, entropy {row['entropy']:.3g} nats, "
        f"grad norm {row['grad_norm']:.3g}"
    )


# ---- report ---------------------------------------------------------------------------------


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


STUDY = Study(
    name="scale_ablation",
    settings=SETTINGS,
    flags=FLAGS,
    measurements=MEASUREMENTS,
    points=points,
    measure=measure,
    report=report,
    summary=summary,
    describe=describe,
)
