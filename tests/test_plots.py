"""Method families on the registry, and sweep figures that colour and group lines by family."""

from __future__ import annotations

import pytest

import efficient_attn as ea
from efficient_attn import cli
from efficient_attn.core import registry
from efficient_attn.sweep import plots, report, runner, spec, styles, worker

#: The built-in methods' families (a new method is added here when it is registered).
EXPECTED = {
    "full": {"dense", "additive", "xla", "cudnn", "pallas_mha", "tokamax", "blockwise"},
    "sparse": {"local", "strided", "bigbird"},
    "linear": {"linear_elu", "linear_relu", "linear_softmax", "performer"},
    "gated": {"retnet", "mamba2", "gla", "deltanet", "gated_deltanet"},
}


def test_every_registered_method_has_a_known_family():
    builtin = set().union(*EXPECTED.values())
    assert set(ea.methods()) <= builtin, "add a new method's family to EXPECTED"
    for name in ea.methods():
        assert ea.get_method(name).family in ea.FAMILIES, name
    for family, names in EXPECTED.items():
        assert {ea.get_method(n).family for n in names} == {family}
    assert styles.family_of("no_longer_registered") == "other"


def _fn(q, k, v, *, causal, kv_lengths, scale):
    return q


@pytest.mark.parametrize(
    "kwargs,family",
    [
        ({"exact": True}, "full"),
        ({"exact": False, "weights": _fn, "pattern": _fn}, "sparse"),
        ({"exact": False, "weights": _fn}, "other"),
        ({"exact": False, "weights": _fn, "family": "linear"}, "linear"),
    ],
)
def test_family_default_and_explicit(kwargs, family):
    try:
        ea.register_method("_test_family", **kwargs)(_fn)
        assert ea.get_method("_test_family").family == family
    finally:
        registry.unregister_method("_test_family")


def test_unknown_family_is_an_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="unknown family='fast'; valid families: full, sparse"):
        ea.register_method("_test_family", exact=True, family="fast")


def _rows(methods, lengths=(256, 1024)) -> list[dict]:
    """Rows with a time only (a report of them draws only the time figures)."""
    rows = []
    for i, method in enumerate(methods):
        for t in lengths:
            p = spec.Point(method, {}, t, 1, 4, 4, 64, "float32", True, "fwd")
            row = worker.base_row(p.identity(), "ok")
            ms = (i + 1) * 1e-3 * t
            rows.append({**row, "time_ms": ms, "time_ms_min": ms, "time_ms_max": ms})
    return rows


# 19 registered methods and one no longer registered (an old results row): 20 lines.
TWENTY = [*sorted(set().union(*EXPECTED.values())), "old_method"]


def test_twenty_methods_get_distinct_styles_and_a_legend_grouped_by_family():
    (data,) = report.group(_rows(TWENTY))
    fig = plots.metric_figure(data, report.TIME, "cpu")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in TWENTY}
    assert set(lines) == set(TWENTY)
    pairs = {(tuple(line.get_color()), line.get_marker()) for line in lines.values()}
    assert len(pairs) == len(TWENTY)

    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    headings = [label for label in labels if label in ea.FAMILIES.values()]
    assert headings == [ea.FAMILIES[f] for f in ("full", "sparse", "linear", "gated", "other")]
    family = None
    for label in labels:  # each method sits under its own family's heading
        if label in headings:
            family = next(f for f, title in ea.FAMILIES.items() if title == label)
        else:
            assert styles.family_of(label) == family, label
    assert sum(label in TWENTY for label in labels) == len(TWENTY)


def test_panels_option_writes_one_panel_per_family_with_the_references(tmp_path):
    for row in _rows(["dense", "xla", "local", "performer", "gla"]):
        runner.append_row(tmp_path / "results.jsonl", row)
    (data,) = report.group(runner.merge_rows([tmp_path]))
    fig = plots.family_panels_figure(data, report.TIME, "cpu")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        ea.FAMILIES[f] for f in ("full", "sparse", "linear", "gated")
    ]
    for ax in panels:
        drawn = {line.get_label() for line in ax.get_lines()}
        assert {"dense", "xla"} <= drawn or {"dense (reference)", "xla (reference)"} <= drawn

    assert cli.main(["report", str(tmp_path), "--panels"]) == 0
    figures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert figures == [f"time-{k}fwd-float32-causal-b1-n4-k4-h64.png" for k in ("families-", "")]
    md = (tmp_path / "report.md").read_text()
    assert all(f"]({f})" in md for f in figures)
