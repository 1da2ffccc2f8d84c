"""How figures tell methods apart: a hue per family, a shade, marker and dash per method.

With 16+ methods a 10-colour cycle repeats colours and mixes families. Here a
line's method picks its family from its registry entry (``Method.family``;
``"other"`` for a method that is not registered, e.g. an old results row), the
family picks a colour map, and the lines of a family take evenly spaced shades
of it, each with its own marker and dash: no two lines share a (colour, marker)
pair, and a family reads as one hue. :func:`family_legend` lists the lines
under a heading per family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D

import efficient_attn as ea

#: Family -> matplotlib colour map its lines take shades of.
FAMILY_COLORMAPS: Mapping[str, str] = {
    "full": "Blues",
    "sparse": "Greens",
    "linear": "Oranges",
    "gated": "Purples",
    "other": "Greys",
}
MARKERS = "osD^v<>pPhX*"
DASHES = ("-", "--", "-.", ":")
_DARKEST, _LIGHTEST = 0.95, 0.45  # positions in the colour map (the lightest stays visible)


@dataclasses.dataclass(frozen=True)
class Style:
    """One line's family, colour (RGBA), marker and dash."""

    family: str
    color: tuple[float, float, float, float]
    marker: str
    linestyle: str

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Axes.plot``."""
        return {"color": self.color, "marker": self.marker, "ls": self.linestyle}


def family_of(method: str) -> str:
    """The family of a registered method, ``"other"`` for a name the registry does not know."""
    try:
        family = ea.get_method(method).family
    except ValueError:
        return "other"
    return family if family in ea.FAMILIES else "other"


def family_color(family: str) -> tuple[float, float, float, float]:
    """The middle shade of ``family``'s colour map (legend headings)."""
    return matplotlib.colormaps[FAMILY_COLORMAPS[family]](0.75)


def styles(lines: Mapping[str, str]) -> dict[str, Style]:
    """Line label -> its method, to line label -> :class:`Style`.

    The result is ordered by family (:data:`efficient_attn.FAMILIES`' order),
    then by the registration order of the methods, then by appearance; a
    family's first line takes the darkest shade.
    """
    rank = {m: i for i, m in enumerate(ea.methods())}
    families = list(ea.FAMILIES)
    appearance = {label: i for i, label in enumerate(lines)}
    order = sorted(
        lines,
        key=lambda label: (
            families.index(family_of(lines[label])),
            rank.get(lines[label], len(rank)),
            appearance[label],
        ),
    )
    out: dict[str, Style] = {}
    for family in families:
        members = [label for label in order if family_of(lines[label]) == family]
        cmap = matplotlib.colormaps[FAMILY_COLORMAPS[family]]
        step = (_DARKEST - _LIGHTEST) / max(len(members) - 1, 1)
        for i, label in enumerate(members):
            shade = _DARKEST - i * step if len(members) > 1 else 0.75
            out[label] = Style(family, cmap(shade), MARKERS[i % len(MARKERS)], DASHES[i % 4])
    return out


def family_legend(
    ax: Axes | Figure,
    entries: Sequence[tuple[Any, str, str]],
    extra: Sequence[tuple[Any, str]] = (),
    **kwargs: Any,
) -> Legend:
    """A legend of ``(handle, label, family)`` entries under a bold heading per family.

    Families come in :data:`efficient_attn.FAMILIES`' order, entries in their
    given order within a family; a heading's key is a bar of the family's
    colour. ``extra`` ``(handle, label)`` entries follow (e.g. failure markers);
    ``kwargs`` go to ``ax.legend`` (``ax`` may be a ``Figure``: one legend for its panels).
    """
    unknown = sorted({f for _, _, f in entries} - set(ea.FAMILIES))
    if unknown:
        raise ValueError(f"unknown famil(ies) {unknown}; valid families: {', '.join(ea.FAMILIES)}")
    handles: list[Any] = []
    labels: list[str] = []
    headings: set[int] = set()
    for family, title in ea.FAMILIES.items():
        members = [(h, label) for h, label, f in entries if f == family]
        if not members:
            continue
        headings.add(len(labels))
        handles.append(Line2D([], [], color=family_color(family), lw=5, solid_capstyle="butt"))
        labels.append(title)
        for h, label in members:
            handles.append(h)
            labels.append(label)
    for h, label in extra:
        handles.append(h)
        labels.append(label)
    legend = ax.legend(handles, labels, **kwargs)
    for i, text in enumerate(legend.get_texts()):
        if i in headings:
            text.set_fontweight("bold")
    return legend
