"""Attention families, one file each; importing this package registers them."""

from efficient_attn.methods import baselines, blockwise, dense  # noqa: F401
