"""Synthetic tasks generated on the fly from a seed (no downloads)."""

from efficient_attn.tasks.seq2seq import BOS, Reverse, Seq2SeqBatch, Sort
from efficient_attn.tasks.synthetic import TASKS, Batch, LongRange, Mqar, make_task

__all__ = [
    "BOS",
    "TASKS",
    "Batch",
    "LongRange",
    "Mqar",
    "Reverse",
    "Seq2SeqBatch",
    "Sort",
    "make_task",
]
