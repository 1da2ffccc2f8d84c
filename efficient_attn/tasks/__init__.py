"""Synthetic tasks generated on the fly from a seed (no downloads)."""

from efficient_attn.tasks.synthetic import TASKS, Batch, LongRange, Mqar, make_task

__all__ = ["TASKS", "Batch", "LongRange", "Mqar", "make_task"]
