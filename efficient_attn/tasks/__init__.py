"""Synthetic tasks generated on the fly from a seed (no downloads)."""

from efficient_attn.tasks.listops import ClassBatch, ListOps
from efficient_attn.tasks.seq2seq import BOS, Reverse, Seq2SeqBatch, Sort
from efficient_attn.tasks.synthetic import TASKS, Batch, LongRange, Mqar, make_task

__all__ = [
    "BOS",
    "TASKS",
    "Batch",
    "ClassBatch",
    "ListOps",
    "LongRange",
    "Mqar",
    "Reverse",
    "Seq2SeqBatch",
    "Sort",
    "make_task",
]
