"""Synthetic recall tasks for language models, generated from a seed.

Every batch is a pure function of ``(task config, seed, step)``, so a resumed
run sees exactly the data stream it would have seen without the interruption,
and held-out batches (a different seed) never overlap the training stream's
randomness. Labels are next-token targets; ``mask`` marks the positions that
are scored (loss and accuracy).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp


class Batch(NamedTuple):
    inputs: jax.Array  # int [B, T]
    targets: jax.Array  # int [B, T]: target token at each position
    mask: jax.Array  # bool [B, T]: positions that are scored


def _key(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


@dataclasses.dataclass(frozen=True)
class Mqar:
    """Multi-query associative recall (Arora et al. 2023, Zoology).

    A sequence starts with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...``
    (distinct keys from the lower half of the vocabulary, values from the
    upper half); every key is then queried once, in random order, at random
    later positions (other positions hold token 0). At a query position the
    model must output the value that followed that key.
    """

    kind: ClassVar[str] = "lm"  # decoder-only (next-token targets); see tasks.seq2seq
    seq_len: int = 64
    vocab_size: int = 64
    num_pairs: int = 4

    def __post_init__(self):
        half = self.vocab_size // 2
        if self.num_pairs < 1 or self.num_pairs > half - 1:
            raise ValueError(f"num_pairs={self.num_pairs} must be in [1, {half - 1}]")
        if 3 * self.num_pairs > self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} must be >= 3 * num_pairs")

    def batch(self, seed: int, step: int, batch_size: int) -> Batch:
        half, p, t = self.vocab_size // 2, self.num_pairs, self.seq_len

        def one(key):
            kk, kv, kq, kp = jax.random.split(key, 4)
            keys = jax.random.choice(kk, jnp.arange(1, half), (p,), replace=False)
            values = jax.random.randint(kv, (p,), half, self.vocab_size)
            order = jax.random.permutation(kq, p)
            slots = jax.random.choice(kp, jnp.arange(2 * p, t), (p,), replace=False)
            inputs = jnp.zeros((t,), jnp.int32)
            inputs = inputs.at[0 : 2 * p : 2].set(keys).at[1 : 2 * p : 2].set(values)
            inputs = inputs.at[slots].set(keys[order])
            targets = jnp.zeros((t,), jnp.int32).at[slots].set(values[order])
            mask = jnp.zeros((t,), bool).at[slots].set(True)
            return inputs, targets, mask

        keys = jax.random.split(_key(seed, step), batch_size)
        return Batch(*jax.vmap(one)(keys))


@dataclasses.dataclass(frozen=True)
class LongRange:
    """Long-range dependency: at each of the last ``num_queries`` positions a marker
    token (0) asks for the token exactly ``distance`` positions back.

    A model whose attention cannot reach ``distance`` tokens back (``local``
    with a smaller window) can only guess: chance accuracy is 1/(vocab-1).
    """

    kind: ClassVar[str] = "lm"
    seq_len: int = 64
    vocab_size: int = 16
    distance: int = 16
    num_queries: int = 8

    def __post_init__(self):
        if not 1 <= self.num_queries <= self.distance:
            raise ValueError(f"num_queries={self.num_queries} must be in [1, distance]")
        if self.distance + self.num_queries > self.seq_len:
            raise ValueError(
                f"distance + num_queries = {self.distance + self.num_queries} "
                f"must be <= seq_len={self.seq_len}"
            )

    def batch(self, seed: int, step: int, batch_size: int) -> Batch:
        t, q, d = self.seq_len, self.num_queries, self.distance
        tokens = jax.random.randint(_key(seed, step), (batch_size, t), 1, self.vocab_size)
        query_pos = jnp.arange(t - q, t)
        inputs = tokens.at[:, query_pos].set(0)
        targets = jnp.zeros_like(tokens).at[:, query_pos].set(tokens[:, query_pos - d])
        mask = jnp.zeros((batch_size, t), bool).at[:, query_pos].set(True)
        return Batch(inputs, targets, mask)


#: name -> task class; tasks.seq2seq adds the encoder-decoder tasks.
TASKS: dict[str, type] = {"mqar": Mqar, "long_range": LongRange}


def make_task(name: str, **kwargs) -> Any:
    """Build a task by name; ``kwargs`` that are None are left at their defaults."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    cls = TASKS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in fields)
    if unknown:
        raise ValueError(f"task {name!r} has no setting(s) {unknown}; valid: {sorted(fields)}")
    return cls(**{k: v for k, v in kwargs.items() if v is not None})
