"""ListOps (Nangia & Bowman 2018) as Long Range Arena generates it (Tay et al. 2020).

The tree distribution is LRA's ``lra_benchmarks/data/listops.py``
(google-research/long-range-arena): a node at depth ``d < max_depth`` is a
digit 0-9 with probability ``1 - VALUE_P`` = 0.75 (LRA draws ``r = random()``
and makes a digit when ``r > VALUE_P``), else one of ``[MIN``, ``[MAX``,
``[MED`` (``int(np.median)``) and ``[SM`` (sum mod 10) applied to 2..``max_args`` subtrees; nodes at
``max_depth`` are digits; the root is at depth 1. A tree is kept when its token
count lies strictly between ``min_length`` and ``max_length`` (LRA's
``length > min_length and length < max_length``). Tokens are written without
parentheses, as LRA's input pipeline removes them, so an expression is e.g.
``[MAX 2 9 [MIN 4 7 ] 0 ]`` and its label is 9.

Unlike LRA's fixed 96k/2k/2k TSV files, every batch is a pure function of
``(seed, step)`` (NumPy's generator seeded with ``[seed, step]``); duplicates
are not removed. Generation stops a tree as soon as it is longer than allowed
(that draw would be rejected anyway, so the accepted distribution is the
same) and raises :class:`ValueError` when the lengths cannot be reached, or
when too few draws land in range to fill a batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import numpy as np

from efficient_attn.tasks.synthetic import TASKS

#: LRA's operators (FIRST and LAST are commented out there) and their token strings.
OPERATORS: tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
PAD = "<pad>"
#: token id -> string: padding, digits 0-9, operators, the closing bracket.
VOCAB: tuple[str, ...] = (PAD, *(str(d) for d in range(10)), *OPERATORS, END)
VALUE_P = 0.25
_DIGIT0 = 1
_OP0 = _DIGIT0 + 10
_END = _OP0 + len(OPERATORS)
#: draws per example before :meth:`ListOps.batch` gives up (acceptance rate too low)
MAX_DRAWS_PER_EXAMPLE = 2000


class ClassBatch(NamedTuple):
    """A classification batch; ``targets``/``mask`` let the LM metrics score it unchanged."""

    inputs: np.ndarray  # int32 [B, T]: token ids, padded with 0 after ``lengths``
    targets: np.ndarray  # int32 [B]: the class (ListOps: the expression's value, 0-9)
    mask: np.ndarray  # bool [B]: all True (every example is scored)
    lengths: np.ndarray  # int32 [B]: tokens before the padding

    @property
    def labels(self) -> np.ndarray:
        return self.targets


class _TooLong(Exception):
    pass


def _apply(op: int, args: list[int]) -> int:
    if op == 0:
        return min(args)
    if op == 1:
        return max(args)
    if op == 2:
        return int(np.median(args))
    return int(np.sum(args) % 10)


def _draw(rng: np.random.Generator, depth: int, c: ListOps, out: list[int]) -> int:
    """Append one tree's tokens to ``out`` (raising :class:`_TooLong` past the limit); its value."""
    if len(out) >= c.max_length - 1:
        raise _TooLong
    if depth < c.max_depth and rng.random() <= VALUE_P:
        num_args = int(rng.integers(2, c.max_args + 1))
        at = len(out)
        out.append(0)  # the operator, drawn after its arguments as LRA does
        args = [_draw(rng, depth + 1, c, out) for _ in range(num_args)]
        op = int(rng.integers(len(OPERATORS)))
        out[at] = _OP0 + op
        if len(out) >= c.max_length - 1:
            raise _TooLong
        out.append(_END)
        return _apply(op, args)
    value = int(rng.integers(10))
    out.append(_DIGIT0 + value)
    return value


@functools.cache
def reachable_lengths(max_depth: int, max_args: int, limit: int) -> frozenset[int]:
    """Token counts ``< limit`` that a tree rooted at depth 1 can have."""
    level = np.zeros(limit, bool)
    level[1] = True  # depth max_depth: a digit
    for _ in range(max_depth - 1):  # from depth max_depth - 1 up to the root
        sums = np.zeros(limit, bool)
        sums[0] = True
        nodes = np.zeros(limit, bool)
        for k in range(1, max_args + 1):
            sums = (
                np.convolve(sums.astype(np.int64), level.astype(np.int64))[:limit] > 0
            )  # lengths of k subtrees
            if k >= 2:
                nodes[2:] |= sums[:-2]  # operator + k subtrees + "]"
        level = nodes.copy()
        level[1] = True
    return frozenset(int(t) for t in np.flatnonzero(level))


@dataclasses.dataclass(frozen=True)
class ListOps:
    """ListOps expressions to classify by value (10 classes), LRA's distribution.

    ``inputs [B, T]`` with ``T = max_length`` (padding id 0), ``labels [B]`` in
    0-9. LRA's setting: ``max_depth=10, max_args=10, min_length=500,
    max_length=2000``.
    """

    kind: ClassVar[str] = "classify"
    #: the TrainConfig field that sets this task's length (``seq_len`` is the padded length)
    length_field: ClassVar[str] = "max_length"
    #: batches are built on the host (NumPy), not traced
    host: ClassVar[bool] = True
    num_classes: ClassVar[int] = 10
    vocab: ClassVar[tuple[str, ...]] = VOCAB
    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000

    def __post_init__(self):
        for name in ("max_depth", "max_args", "min_length", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"listops {name}={value!r} must be an int")
        if self.max_depth < 1:
            raise ValueError(f"listops max_depth={self.max_depth} must be >= 1")
        if self.max_args < 2:
            raise ValueError(f"listops max_args={self.max_args} must be >= 2 (LRA: 10)")
        if self.min_length < 0 or self.min_length >= self.max_length:
            raise ValueError(
                f"listops needs 0 <= min_length < max_length; got min_length={self.min_length}, "
                f"max_length={self.max_length} (LRA: 500, 2000)"
            )
        inside = [t for t in self.lengths() if self.min_length < t < self.max_length]
        if not inside:
            reach = sorted(self.lengths())
            raise ValueError(
                f"listops trees with max_depth={self.max_depth}, max_args={self.max_args} "
                f"never have min_length={self.min_length} < length < max_length="
                f"{self.max_length} tokens (reachable lengths below max_length: "
                f"{reach[:3]} ... {reach[-3:]}); raise max_depth or max_args, or change the lengths"
            )

    def lengths(self) -> frozenset[int]:
        """Token counts below ``max_length`` that trees of this depth and arity can have."""
        return reachable_lengths(self.max_depth, self.max_args, self.max_length)

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    @property
    def seq_len(self) -> int:
        return self.max_length

    def example(self, rng: np.random.Generator) -> tuple[list[int], int]:
        """(token ids, value) of one accepted tree; ValueError after too many rejections."""
        for _ in range(MAX_DRAWS_PER_EXAMPLE):
            tokens: list[int] = []
            try:
                value = _draw(rng, 1, self, tokens)
            except _TooLong:
                continue
            if len(tokens) > self.min_length:
                return tokens, value
        raise ValueError(
            f"listops: none of {MAX_DRAWS_PER_EXAMPLE} trees (max_depth={self.max_depth}, "
            f"max_args={self.max_args}) had min_length={self.min_length} < length < "
            f"max_length={self.max_length}; the range is reachable but too rare under LRA's "
            "distribution: widen it or raise max_depth"
        )

    def batch(self, seed: int, step: int, batch_size: int) -> ClassBatch:
        rng = np.random.default_rng([int(seed), int(step)])
        inputs = np.zeros((batch_size, self.max_length), np.int32)
        labels = np.zeros((batch_size,), np.int32)
        lengths = np.zeros((batch_size,), np.int32)
        for i in range(batch_size):
            tokens, labels[i] = self.example(rng)
            inputs[i, : len(tokens)] = tokens
            lengths[i] = len(tokens)
        return ClassBatch(inputs, labels, np.ones((batch_size,), bool), lengths)

    def decode(self, ids: np.ndarray) -> str:
        """Token ids (padding dropped) as the expression's text."""
        return " ".join(VOCAB[int(i)] for i in np.asarray(ids) if int(i) != 0)


TASKS.update(listops=ListOps)  # make_task builds it by name
