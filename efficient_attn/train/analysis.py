"""Attention maps of trained models, for every method, as labelled heatmaps.

:func:`attention_maps` runs a model once and returns the ``[B, N, Tq, Tk]``
weights of each :class:`MultiHeadAttention` call, computed by
``MultiHeadAttention.weights`` (so by :func:`efficient_attn.attention_weights`,
approximate methods included) on exactly the inputs that layer received. A
Flax method interceptor collects them, so no model changes and the parameter
trees (and old checkpoints) stay as they are.

:func:`plot_run` is ``efficient-attn plot-attention``: the maps of one
held-out example of a trained run. :func:`write_alignment` draws the
decoder-to-encoder alignment of a sequence-to-sequence run (Bahdanau, Cho &
Bengio 2014, Fig. 3) after training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from efficient_attn.nn import MultiHeadAttention
from efficient_attn.train.config import TrainConfig
from efficient_attn.train.trainer import EVAL_SEED_OFFSET, Trainer

_COLLECTION = "attention_weights"


def attention_maps(model: nn.Module, params: Any, *inputs: Any, **kwargs: Any) -> dict[str, Any]:
    """``{"block_0/attention": [B, N, Tq, Tk], ...}``: the weights of every attention call.

    ``model.apply(params, *inputs, **kwargs)`` runs once; names are module
    paths (``""`` for a bare layer), in the order the layers first ran.
    """
    order: list[tuple[str, ...]] = []

    def interceptor(next_fun, args, kw, context):
        module = context.module
        if isinstance(module, MultiHeadAttention) and context.method_name == "__call__":
            module.sow(_COLLECTION, "weights", module.weights(*args, **kw))
            order.append(tuple(module.path))
        return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
        _, state = model.apply(params, *inputs, mutable=[_COLLECTION], **kwargs)
    flat = traverse_util.flatten_dict(state[_COLLECTION])
    return {"/".join(path): flat[(*path, "weights")][0] for path in dict.fromkeys(order)}


@dataclasses.dataclass(frozen=True)
class AttentionMap:
    """The weights ``[N, Tq, Tk]`` of one attention layer for one example, with axis labels."""

    name: str  # module path, e.g. "decoder_1/cross_attention"
    layer: int
    weights: np.ndarray  # [N, Tq, Tk]
    key_labels: list[str]  # Tk
    query_labels: list[str]  # Tq
    key_axis: str
    query_axis: str


def _jit_maps(model: nn.Module, params: Any, *inputs: Any) -> dict[str, Any]:
    """:func:`attention_maps` compiled (a jitted dict would come back with sorted keys)."""
    names: list[str] = []

    def maps(params, *inputs):
        result = attention_maps(model, params, *inputs)
        names.extend(result)
        return list(result.values())

    return dict(zip(names, jax.jit(maps)(params, *inputs), strict=True))


def _tokens(x: Any, bos: int | None = None) -> list[str]:
    return ["BOS" if bos is not None and i == 0 and t == bos else str(t) for i, t in enumerate(x)]


def _check_index(flag: str, value: int | None, size: int, what: str) -> None:
    if value is not None and not 0 <= value < size:
        raise ValueError(f"{flag}={value} is out of range: valid {what} are 0..{size - 1}")


def example_maps(trainer: Trainer, params: Any, example: int = 0) -> list[AttentionMap]:
    """Attention maps of held-out example ``example`` (of the first held-out batch).

    Decoder-only models attend over the example's inputs (query rows show
    ``input->target`` at scored positions). Encoder-decoders first decode
    greedily; decoder maps then use the generated outputs as decoder inputs,
    so each row is the step that produced the output labelling it.
    """
    batch = trainer.batch(0, trainer.config.seed + EVAL_SEED_OFFSET)
    _check_index("--example", example, batch.targets.shape[0], "held-out examples")
    one = jax.tree.map(lambda x: x[example : example + 1], batch)
    targets, mask = np.asarray(one.targets[0]), np.asarray(one.mask[0])
    if trainer.generate is None:
        maps = _jit_maps(trainer.model, params, one.inputs)
        keys = _tokens(np.asarray(one.inputs[0]))
        queries = [f"{k}->{t}" if m else k for k, t, m in zip(keys, targets, mask, strict=True)]
        axes = {"block/attention": (keys, queries, "input token", "input token (->target)")}
    else:
        bos = trainer.task.bos
        outputs = trainer.generate(params, one.sources)  # [1, T]
        dec_in = jnp.concatenate([jnp.full((1, 1), bos, outputs.dtype), outputs[:, :-1]], 1)
        maps = _jit_maps(trainer.model, params, one.sources, dec_in)
        src = _tokens(np.asarray(one.sources[0]))
        out = _tokens(np.asarray(outputs[0]))
        axes = {
            "encoder/self_attention": (src, src, "source token", "source token"),
            "decoder/self_attention": (
                _tokens(np.asarray(dec_in[0]), bos),
                out,
                "decoder input",
                "generated output",
            ),
            "decoder/cross_attention": (src, out, "source token", "generated output"),
        }
    result = []
    for name, w in maps.items():  # names are "<stack>_<layer>/<module>"
        block, module = name.split("/")[0], name.split("/")[-1]
        stack, layer = block.rsplit("_", 1)
        weights = np.asarray(w[0])  # [N, Tq, Tk]
        positions = ([str(i) for i in range(n)] for n in weights.shape[:0:-1])
        labels = axes.get(f"{stack}/{module}", (*positions, "key position", "query position"))
        result.append(AttentionMap(name, int(layer), weights, *labels))
    return result


def _heatmaps(panels: list[tuple[str, np.ndarray]], m: AttentionMap, title: str, stem: Path):
    """One heatmap per (subtitle, [Tq, Tk] weights) panel, tokens on the axes; png + pdf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tq, tk = panels[0][1].shape
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    side = max(3.2, 0.16 * max(tq, tk))
    fontsize = 7 if max(tq, tk) <= 24 else 5
    width = max(side * cols + 1.0, 7.0)  # room for a two-line title
    fig, axes = plt.subplots(rows, cols, figsize=(width, side * rows + 1.2), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (subtitle, w) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(w, cmap="viridis", vmin=min(0.0, float(w.min())), aspect="equal")
        ax.set_xticks(range(tk), m.key_labels, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(tq), m.query_labels, fontsize=fontsize)
        ax.set_xlabel(m.key_axis, fontsize=8)
        ax.set_ylabel(m.query_axis, fontsize=8)
        ax.set_title(subtitle, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(stem.with_suffix(f".{ext}"), dpi=150)
    plt.close(fig)


def write_alignment(
    trainer: Trainer, params: Any, out: str | Path, *, accuracy: float, example: int = 0
) -> Path:
    """``out/alignment.png``/``.pdf``: the last decoder layer's cross-attention.

    Source tokens on x, greedy outputs on y, for held-out example ``example``:
    the mean over heads, then (with several heads) each head; titled with the
    task, method and ``accuracy``.
    """
    maps = [m for m in example_maps(trainer, params, example) if m.name.endswith("cross_attention")]
    if not maps:
        raise ValueError(f"task {trainer.config.task!r} has no cross-attention to plot")
    last = maps[-1]
    c = trainer.config
    heads = last.weights.shape[0]
    panels = [(f"mean of {heads} heads", last.weights.mean(axis=0))] if heads > 1 else []
    panels += [(f"head {h}", last.weights[h]) for h in range(heads)]
    title = (
        f"{c.task}, method={c.method}: held-out greedy accuracy {accuracy:.4f}\n"
        f"cross-attention of decoder layer {last.layer} (the last of {len(maps)}), "
        f"held-out example {example}"
    )
    stem = Path(out) / "alignment"
    _heatmaps(panels, last, title, stem)
    return stem.with_suffix(".png")


def write_run_alignment(run_dir: str | Path) -> Path:
    """:func:`write_alignment` for a finished sequence-to-sequence run (its last checkpoint)."""
    run_dir = Path(run_dir)
    final = json.loads((run_dir / "final.json").read_text())
    trainer = Trainer(TrainConfig(**final["config"]), run_dir)
    manager = trainer.checkpoint_manager()
    try:
        state = trainer.restore(manager)
    finally:
        manager.close()
    return write_alignment(trainer, state["params"], run_dir, accuracy=final["accuracy"])


def plot_run(
    run_dir: str | Path, *, example: int = 0, layer: int | None = None, head: int | None = None
) -> list[Path]:
    """Heatmaps of a trained run's attention (latest checkpoint) in ``run_dir/attention/``.

    One png + pdf per attention layer (``ex{example}-{module path}.png``),
    one panel per head; ``layer``/``head`` select one. Returns the png paths.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise ValueError(f"{run_dir} has no config.json: not a run of `efficient-attn train`")
    config = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    _check_index("--layer", layer, config.num_layers, "layers")
    _check_index("--head", head, config.num_heads, "heads")
    _check_index("--example", example, config.batch_size, "held-out examples")
    trainer = Trainer(config, run_dir)
    manager = trainer.checkpoint_manager()
    try:
        if manager.latest_step() is None:
            raise ValueError(f"{run_dir} has no checkpoints to restore")
        state = trainer.restore(manager)
    finally:
        manager.close()
    step = int(state["step"])
    out = run_dir / "attention"
    out.mkdir(exist_ok=True)
    written = []
    for m in example_maps(trainer, state["params"], example):
        if layer is not None and m.layer != layer:
            continue
        heads = range(m.weights.shape[0]) if head is None else [head]
        panels = [(f"head {h}", m.weights[h]) for h in heads]
        title = (
            f"{config.task}, method={config.method}, step {step}: {m.name} (layer {m.layer}), "
            f"held-out example {example}"
        )
        stem = out / (
            f"ex{example}-{m.name.replace('/', '-')}" + ("" if head is None else f"-head{head}")
        )
        _heatmaps(panels, m, title, stem)
        written.append(stem.with_suffix(".png"))
    return written
