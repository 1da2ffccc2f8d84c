"""What a method declares beside its function: family, features, array options, decoding form.

The records :func:`efficient_attn.core.registry.register_method` takes:
:data:`FAMILIES` (the kind of attention a method is: reports colour and group
methods by it), :data:`FEATURES` (what a method supports; the API raises ``ValueError`` when a
call needs one it does not declare), :class:`ArrayOption` (an array a method
requires, e.g. ``additive``'s learned projections, with its shape and
initialiser; *per-token* arrays, shape starting ``("B", "T", ...)``, are
computed by the Flax layer with a learned :class:`TokenProjection`),
:class:`Recurrent` (the token-by-token form of a causal recurrence, for
decoding) and :class:`Native` (a method that *is* a library's attention).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

#: Families of methods, name -> heading in reports (figures colour and group methods by
#: family). ``register_method(family=...)`` takes a name; :func:`default_family` derives one.
FAMILIES: Mapping[str, str] = types.MappingProxyType(
    {
        "full": "full attention",  # every query-key pair: softmax (dense, flash, kernels), additive
        "sparse": "sparse attention",  # a fixed pattern of pairs: local, strided, bigbird
        "linear": "feature-map linear",  # phi(q) phi(k)^T, no decay: linear_*, performer
        "gated": "gated / delta rule",  # decaying or delta-rule recurrences: retnet, gla, deltanet
        "other": "other",  # none of these (and result rows of methods no longer registered)
    }
)


def default_family(*, exact: bool, sparse: bool, causal_only: bool, recurrent: bool) -> str:
    """The family of a method registered without ``family=``, from what it declares.

    Exact methods are full attention; a method with a sparsity ``pattern`` is
    sparse; a causal-only recurrence is gated; another method with a recurrent
    form is feature-map linear; anything else is ``"other"``.
    """
    if exact:
        return "full"
    if sparse:
        return "sparse"
    if causal_only:
        return "gated"
    return "linear" if recurrent else "other"


#: Features a method may support. The API raises ``ValueError`` when a call
#: needs a feature the method does not declare, so nothing is silently ignored.
FEATURES: tuple[str, ...] = (
    "causal",  # causal=True (bottom-right aligned)
    "kv_lengths",  # per-example key padding
    "cross",  # Tq != Tk
    "gqa",  # fewer key/value heads than query heads (K < N)
    "grad",  # differentiable with respect to q, k, v
    "mask_mod",  # mask_mod= and block_mask= (FlexAttention's programming model)
    "score_mod",  # score_mod=
    "bias",  # bias= broadcastable to [B, N, Tq, Tk], added to the scaled logits
    "dropout",  # dropout= (a masking.Dropout: counter-based, the same mask for every method)
    "lse",  # return_lse=True returns (out, lse [B, Tq, N])
)

#: What ``register_method`` assumes when ``supports=`` is not given: everything but the mods.
BASIC_FEATURES: tuple[str, ...] = FEATURES[:5]
#: The basic features and FlexAttention's mods.
MOD_FEATURES: tuple[str, ...] = FEATURES[:7]

_STANDARD_KWARGS = ("causal", "kv_lengths", "scale")
#: Keyword arguments a method receives for each feature it supports beyond the basic ones.
_FEATURE_KWARGS = {
    "mask_mod": ("mask_mod", "block_mask"),
    "score_mod": ("score_mod",),
    "bias": ("bias",),
    "dropout": ("dropout",),
    "lse": ("return_lse",),
}

#: Dimension name of :attr:`ArrayOption.shape` bound to the query/key head_dim.
HEAD_DIM = "H"
#: Dimension names bound to the call's inputs: batch B, key positions T (= Tk),
#: key/value heads K, and head_dim H.
BOUND_DIMS: tuple[str, ...] = ("B", "T", "K", HEAD_DIM)


@dataclasses.dataclass(frozen=True)
class TokenProjection:
    """How a layer computes a per-token array from its input ``x [B, T, D]``.

    ``activation(x @ W1 @ W2)`` reshaped to the array's shape, with ``W1 [D, rank]``
    (no W1 when ``rank`` is None) and ``W2 [rank or D, prod(shape[2:])]`` plus a bias
    (FLA's layers: GLA's low-rank gate with ``logsigmoid / 16``, DeltaNet's sigmoid beta).
    """

    activation: Callable[[Any], Any]
    rank: int | None = None


@dataclasses.dataclass(frozen=True)
class Recurrent:
    """The token-by-token (decoding) form of a causal method.

    ``init_state(batch, kv_heads, head_dim, value_dim, *, dtype, **options) -> state``
    and ``step(state, q_t [B, N, H], k_t [B, K, H], v_t [B, K, Hv], *, scale, valid,
    **options) -> (out_t [B, N, Hv], state)``; ``options`` are the method's resolved
    options, per-token arrays given for this token (``[B, K, ...]``, T dropped).
    Used by :func:`efficient_attn.linear_init_state` / :func:`efficient_attn.linear_step`.
    """

    init_state: Callable[..., Any]
    step: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Native:
    """A method that *is* a library's attention: the drop-in calls it with the library's arguments.

    ``fn`` has ``jax.nn.dot_product_attention``'s signature; ``args`` are the
    drop-in arguments it honours (see :data:`efficient_attn.dropin.ARGS`).
    """

    fn: Callable[..., Any]
    args: frozenset[str]


@dataclasses.dataclass(frozen=True)
class ArrayOption:
    """An array a method requires as an option, e.g. a projection learned with the model.

    Attributes:
      shape: dimension names. ``"H"`` is the head_dim of query and key,
        ``"B"``, ``"T"``, ``"K"`` the batch, key length and K/V heads; any
        other name is a size the method's arrays share (checked to agree;
        its default for :func:`init_arrays` is in the method's ``sizes``).
      init: ``init(key, shape, dtype) -> array``, e.g. a
        :mod:`jax.nn.initializers` function; used by :func:`init_arrays` and
        by the Flax layer to create the parameter.
      description: what the array is, for ``efficient-attn methods``.
      project: for per-token arrays (shape ``("B", "T", ...)``, bound to the
        batch and the key positions): how the Flax layer computes it from its
        input; required for them, None otherwise.
      required: False when the method fills a missing array with ``init``'s
        value (deterministic defaults that callers may override, e.g. ``retnet``'s decays).
    """

    shape: tuple[str, ...]
    init: Callable[..., Any]
    description: str = ""
    project: TokenProjection | None = None
    required: bool = True

    @property
    def per_token(self) -> bool:
        """One value per (batch, key position): an input of the call, not a parameter."""
        return self.shape[:2] == ("B", "T")
