"""Named mod variants (``"window:256"``): the values of a sweep's ``mods`` axis."""

from __future__ import annotations

from typing import Any

import numpy as np

from efficient_attn.core.mods.base import _int
from efficient_attn.core.mods.masks import (
    causal_bottom_right,
    document_mask,
    prefix_lm,
    sliding_window,
)
from efficient_attn.core.mods.scores import alibi, alibi_slopes, soft_cap

#: Names usable as the ``mods`` axis of a sweep, with their parameter.
VARIANTS = {
    "none": "plain attention",
    "causal": "causal mask (top-left, self-attention)",
    "window": "causal sliding window of N keys: window:256",
    "documents": "N equal packed documents, causal: documents:16",
    "prefix": "prefix-LM with a prefix of N tokens: prefix:512",
    "alibi": "ALiBi with the paper's slopes, causal",
    "softcap": "tanh soft-cap C on the logits, causal: softcap:30",
}


def from_spec(spec: str, q_len: int, kv_len: int, heads: int) -> tuple[Any, Any]:
    """``(mask_mod, score_mod)`` of a named variant such as ``"window:256"`` (see :data:`VARIANTS`).

    Data-dependent variants (``documents``) return mods over arrays, so a sweep
    measures the on-device block-mask build too.
    """
    name, _, arg = str(spec).partition(":")
    if name not in VARIANTS:
        raise ValueError(f"unknown mods variant {spec!r}; valid: {', '.join(VARIANTS)}")
    needs_arg = name in ("window", "documents", "prefix", "softcap")
    if needs_arg != bool(arg):
        raise ValueError(f"mods variant {spec!r}: {VARIANTS[name]}")
    try:
        value = float(arg) if name == "softcap" else int(arg) if arg else 0
    except ValueError:
        raise ValueError(f"mods variant {spec!r}: {VARIANTS[name]}") from None
    causal = causal_bottom_right(q_len, kv_len)
    if name == "none":
        return None, None
    if name == "causal":
        return causal, None
    if name == "window":
        return sliding_window(_int("window", value, 1) - 1, offset=kv_len - q_len), None
    if name == "documents":
        docs = _int("documents", value, 1)
        seg = (np.arange(max(q_len, kv_len)) * docs // max(q_len, kv_len)).astype(np.int32)
        q_seg, kv_seg = seg[None, -q_len:], seg[None, -kv_len:]
        return document_mask(q_seg, kv_seg) & causal, None
    if name == "prefix":
        return prefix_lm(_int("prefix", value)), None
    if name == "alibi":
        return causal, alibi(alibi_slopes(heads), offset=kv_len - q_len)
    return causal, soft_cap(value)
