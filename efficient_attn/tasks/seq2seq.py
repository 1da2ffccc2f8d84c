"""Sequence-to-sequence tasks for encoder-decoder models, generated from a seed.

A batch is a pure function of ``(task config, seed, step)`` as in
:mod:`efficient_attn.tasks.synthetic`. Token 0 is the beginning-of-sequence
marker (BOS) that starts every decoder input; content tokens are ``1 ..
vocab_size - 1``. The decoder input is the target shifted right by one
(teacher forcing): ``inputs = [BOS, targets[:-1]]``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from efficient_attn.tasks.synthetic import TASKS, _key

BOS = 0


class Seq2SeqBatch(NamedTuple):
    sources: jax.Array  # int [B, S]: encoder input
    inputs: jax.Array  # int [B, T]: decoder input, BOS then the targets shifted right
    targets: jax.Array  # int [B, T]
    mask: jax.Array  # bool [B, T]: positions that are scored (all of them)


@dataclasses.dataclass(frozen=True)
class _Seq2SeqTask:
    """Fixed-length source of uniform content tokens.

    Subclasses define ``transform(sources [B, S]) -> targets [B, S]``.
    """

    kind: ClassVar[str] = "seq2seq"
    bos: ClassVar[int] = BOS
    seq_len: int = 16
    vocab_size: int = 16

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2")
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 3 (BOS + 2 tokens)")

    def batch(self, seed: int, step: int, batch_size: int) -> Seq2SeqBatch:
        shape = (batch_size, self.seq_len)
        sources = jax.random.randint(_key(seed, step), shape, BOS + 1, self.vocab_size)
        targets = self.transform(sources)
        inputs = jnp.concatenate([jnp.full((batch_size, 1), BOS), targets[:, :-1]], axis=1)
        return Seq2SeqBatch(sources, inputs.astype(jnp.int32), targets, jnp.ones(shape, bool))


@dataclasses.dataclass(frozen=True)
class Reverse(_Seq2SeqTask):
    """Output the source reversed: ``y_t = x_{S-1-t}``.

    The decoder must attend to one source position per output step, so an
    encoder-decoder's cross-attention learns an anti-diagonal alignment
    (Bahdanau, Cho & Bengio 2014 plot such alignments for translation).
    """

    def transform(self, sources: jax.Array) -> jax.Array:
        return sources[:, ::-1]


@dataclasses.dataclass(frozen=True)
class Sort(_Seq2SeqTask):
    """Output the source tokens in ascending order (with repeats)."""

    def transform(self, sources: jax.Array) -> jax.Array:
        return jnp.sort(sources, axis=1)


TASKS.update(reverse=Reverse, sort=Sort)  # make_task builds them by name
