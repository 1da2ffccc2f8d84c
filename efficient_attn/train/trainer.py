"""One run's model, optimizer, jitted train/eval steps and checkpoint manager.

AdamW with linear warmup and cosine decay (optax); held-out evaluation on a
separate seed (:data:`EVAL_SEED_OFFSET`), teacher-forced, plus greedy
decoding's accuracy for sequence-to-sequence models; orbax checkpoints.

Training runs in blocks: :meth:`Trainer.train_block` is one dispatch of
``n`` optimizer steps (``lax.scan``, the state donated), whose batches are
generated on the device inside the scan (host tasks such as ListOps: built by
NumPy for the whole block and sent once), so the host is not in the loop
between steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from efficient_attn.nn import Classifier, DecoderLM, EncoderDecoder, greedy_decode
from efficient_attn.tasks import Batch
from efficient_attn.train.config import TrainConfig

EVAL_SEED_OFFSET = 1_000_003  # held-out batches come from a disjoint seed

#: task kind -> (model class, batch -> the model's inputs)
MODELS: dict[str, tuple[type, Callable[[Any], tuple[jax.Array, ...]]]] = {
    "lm": (DecoderLM, lambda b: (b.inputs,)),
    "seq2seq": (EncoderDecoder, lambda b: (b.sources, b.inputs)),
    "classify": (Classifier, lambda b: (b.inputs, b.lengths)),
}


def masked_metrics(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy, accuracy) over the scored positions."""
    mask = batch.mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch.targets)
    denom = jnp.maximum(mask.sum(), 1.0)
    correct = (jnp.argmax(logits, -1) == batch.targets).astype(jnp.float32)
    return (ce * mask).sum() / denom, (correct * mask).sum() / denom


class Trainer:
    """Holds the model, optimizer, jitted steps and checkpoint manager of one run."""

    def __init__(self, config: TrainConfig, out: str | Path):
        config.validate()
        self.config, self.out = config, Path(out)
        self.task = config.task_obj()
        model_cls, self.model_inputs = MODELS[self.task.kind]
        self.model = model_cls(config.model_config())
        #: ``generate(params, sources [B, S]) -> [B, T]`` greedy outputs (seq2seq), else None
        self.generate = None
        if isinstance(self.model, EncoderDecoder):
            self.generate = jax.jit(
                functools.partial(
                    greedy_decode, self.model, length=config.seq_len, bos=self.task.bos
                )
            )
        schedule = optax.warmup_cosine_decay_schedule(
            0.0,
            config.learning_rate,
            config.warmup_steps,
            max(config.steps, config.warmup_steps + 1),
        )
        self.tx = optax.adamw(schedule, weight_decay=config.weight_decay)

        def loss_fn(params, batch):
            return masked_metrics(self.model.apply(params, *self.model_inputs(batch)), batch)

        def train_step(state, batch):
            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
            return new, {"loss": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads)}

        self.train_step = jax.jit(train_step, donate_argnums=0)
        self.eval_step = jax.jit(loss_fn)
        #: batches are built by NumPy on the host (listops), not traced
        self.host = bool(getattr(self.task, "host", False))
        size = config.batch_size
        if self.host:
            self._batch = lambda seed, step: jax.tree.map(
                jnp.asarray, self.task.batch(seed, step, size)
            )
        else:
            self._batch = jax.jit(lambda seed, step: self.task.batch(seed, step, size))

        def train_block(state, first, batches, *, n):
            if batches is None:  # generated on the device, step by step
                seed = config.seed
                steps = first + jnp.arange(n, dtype=jnp.int32)
                return jax.lax.scan(
                    lambda s, i: train_step(s, self.task.batch(seed, i, size)), state, steps
                )
            return jax.lax.scan(train_step, state, batches)

        self._train_block = jax.jit(train_block, static_argnames="n", donate_argnums=0)

    def init_state(self) -> dict[str, Any]:
        sample = self.model_inputs(
            jax.tree.map(jnp.asarray, self.task.batch(self.config.seed, 0, 1))
        )
        params = jax.jit(self.model.init)(jax.random.PRNGKey(self.config.seed), *sample)
        return {"params": params, "opt_state": self.tx.init(params), "step": jnp.int32(0)}

    def block_batches(self, first: int, n: int) -> Any:
        """The ``n`` training batches from step ``first``, stacked ``[n, ...]`` for
        :meth:`train_block` (host tasks); None where they are generated on the device."""
        if not self.host:
            return None
        parts = [self.task.batch(self.config.seed, first + i, self.config.batch_size)
                 for i in range(n)]  # fmt: skip
        return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *parts)

    def train_block(self, state: dict[str, Any], first: int, n: int, batches: Any = None):
        """``n`` optimizer steps from step ``first`` in one dispatch (``state`` is donated):
        ``(state, metrics)`` with each metric stacked ``[n]``. ``batches``: from
        :meth:`block_batches` (host tasks); on-device tasks generate theirs in the scan."""
        if self.host and batches is None:
            batches = self.block_batches(first, n)
        return self._train_block(state, jnp.int32(first), batches, n=n)

    def batch(self, step: int, seed: int | None = None) -> Batch:
        """Batch ``step`` of the stream of ``seed`` (default: the training seed)."""
        return self._batch(self.config.seed if seed is None else seed, step)

    def evaluate(self, params) -> dict[str, float]:
        """Held-out loss and accuracy (teacher-forced); greedy decoding's for seq2seq."""
        seed = self.config.seed + EVAL_SEED_OFFSET
        batches = [self.batch(i, seed) for i in range(self.config.eval_batches)]
        losses, accs = zip(*(self.eval_step(params, b) for b in batches), strict=True)
        metrics = {"eval_loss": float(np.mean(losses)), "eval_accuracy": float(np.mean(accs))}
        if self.task.kind == "classify":  # the baseline: always answer the most frequent label
            labels = np.concatenate([np.asarray(b.targets) for b in batches])
            metrics["majority_accuracy"] = float(np.bincount(labels).max() / labels.size)
        if self.generate is not None:
            correct = np.concatenate(
                [np.asarray(self.generate(params, b.sources) == b.targets) for b in batches]
            )  # [eval_batches * B, T]
            mask = np.concatenate([np.asarray(b.mask) for b in batches])
            metrics["eval_greedy_accuracy"] = float((correct & mask).sum() / max(mask.sum(), 1))
            metrics["eval_greedy_exact_match"] = float((correct | ~mask).all(axis=1).mean())
        return metrics

    def checkpoint_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.keep_checkpoints,
            save_interval_steps=self.config.checkpoint_every,
            enable_async_checkpointing=False,
        )
        return ocp.CheckpointManager((self.out / "checkpoints").absolute(), options=options)

    def restore(self, manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
        """The checkpointed state at ``step`` (default: the latest)."""
        step = manager.latest_step() if step is None else step
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(  # shapes only: nothing is initialised or compiled
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(self.init_state),
        )
        return manager.restore(step, args=ocp.args.StandardRestore(target))
