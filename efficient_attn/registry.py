"""The method registry: one record per attention method, filled by one decorator.

A method is a function ``fn(q, k, v, *, causal, kv_lengths, scale, **options)``
with ``q: [B, Tq, N, H]``, ``k: [B, Tk, K, H]``, ``v: [B, Tk, K, Hv]`` returning
``[B, Tq, N, Hv]``. Its options are its remaining keyword-only parameters; each
must have a default, which is the method's recommended setting. The API checks
shapes, dtypes, ``kv_lengths`` and option names before a method is called, so
a method only has to compute.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

#: Features a method may support. The API raises ``ValueError`` when a call
#: needs a feature the method does not declare, so nothing is silently ignored.
FEATURES: tuple[str, ...] = (
    "causal",  # causal=True (bottom-right aligned)
    "kv_lengths",  # per-example key padding
    "cross",  # Tq != Tk
    "gqa",  # fewer key/value heads than query heads (K < N)
    "grad",  # differentiable with respect to q, k, v
)

_STANDARD_KWARGS = ("causal", "kv_lengths", "scale")


@dataclasses.dataclass(frozen=True)
class Method:
    """What the registry knows about one attention method.

    Attributes:
      name: registered name, used as ``method=name``.
      fn: the attention function.
      exact: True when the method equals full softmax attention (up to
        floating-point error); exact methods are compared with a float64
        reference in the conformance suite.
      options: option name -> default value, read from ``fn``'s signature.
      supports: the subset of :data:`FEATURES` the method implements.
      weights: ``weights(q, k, *, causal, kv_lengths, scale, **options)``
        returning the ``[B, N, Tq, Tk]`` float32 matrix the method applies, or
        None for exact methods (their weights are dense softmax weights).
      pattern: ``pattern(tq, tk, *, causal, **options) -> bool [tq, tk]``,
        the query-key pairs a sparse method lets interact, or None.
      available: returns None when the method can run on the default backend,
        else the reason it cannot.
      description: first line of ``fn``'s docstring.
    """

    name: str
    fn: Callable[..., Any]
    exact: bool
    options: Mapping[str, Any]
    supports: frozenset[str]
    weights: Callable[..., Any] | None = None
    pattern: Callable[..., Any] | None = None
    available: Callable[[], str | None] = lambda: None
    description: str = ""

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``given``; unknown names raise ``ValueError``."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.name!r}; valid options: {valid}"
            )
        return {**self.options, **given}


_REGISTRY: dict[str, Method] = {}


def _options_from_signature(name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    missing = [p for p in _STANDARD_KWARGS if p not in params]
    if missing:
        raise TypeError(f"method {name!r}: fn must accept keyword arguments {missing}")
    options = {}
    for p in params.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in _STANDARD_KWARGS:
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"method {name!r}: option {p.name!r} needs a default value")
        options[p.name] = p.default
    return options


def register_method(
    name: str,
    *,
    exact: bool,
    supports: tuple[str, ...] | frozenset[str] = FEATURES,
    weights: Callable[..., Any] | None = None,
    pattern: Callable[..., Any] | None = None,
    available: Callable[[], str | None] | None = None,
    replace: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(q, k, v, *, causal, kv_lengths, scale, **options)``.

    Example::

        @ea.register_method("my_method", exact=False, weights=my_weights)
        def my_method(q, k, v, *, causal, kv_lengths, scale, width: int = 64):
            ...

    Args:
      name: the name users pass as ``method=``.
      exact: whether the method equals softmax attention.
      supports: features from :data:`FEATURES` the method implements.
      weights: explicit-weights function; required for approximate methods.
      pattern: sparsity-pattern function for sparse methods.
      available: platform check returning None or the reason it cannot run.
      replace: allow re-registering an existing name.
    """
    unknown = sorted(set(supports) - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; valid features: {', '.join(FEATURES)}")
    if not exact and weights is None:
        raise ValueError(f"approximate method {name!r} must provide weights=")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and not replace:
            raise ValueError(f"method {name!r} is already registered (pass replace=True)")
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = Method(
            name=name,
            fn=fn,
            exact=exact,
            options=_options_from_signature(name, fn),
            supports=frozenset(supports),
            weights=weights,
            pattern=pattern,
            available=available or (lambda: None),
            description=doc.splitlines()[0] if doc else "",
        )
        return fn

    return decorator


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int if it is a positive integer (not a bool), else ``ValueError``.

    For methods validating their integer options (tile sizes, chunks, features).
    """
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return int(value)


def methods() -> tuple[str, ...]:
    """Names of all registered methods, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The registry record of ``name``; unknown names raise ``ValueError``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown method {name!r}; registered methods: {', '.join(_REGISTRY)}"
        ) from None


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive work)."""
    get_method(name)
    del _REGISTRY[name]
