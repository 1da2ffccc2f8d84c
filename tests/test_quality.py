"""The quality grid: expansion, resumable runs, failing runs as rows, the report."""

from __future__ import annotations

import json

import pytest

from efficient_attn.studies import quality

TINY = {
    "methods": ["dense", "blockwise"],
    "train": {
        "steps": 4, "d_model": 16, "num_layers": 1, "batch_size": 8, "log_every": 2,
        "eval_every": 4, "eval_batches": 1, "checkpoint_every": 2, "warmup_steps": 1,
    },
    "options": {"blockwise": {"block_q": 8}},
    "grid": [
        {"task": "mqar", "seq_len": 16, "num_pairs": [2, 3]},
        {"task": "long_range", "seq_len": 16, "distance": [4], "num_queries": 2},
    ],
}  # fmt: skip


def test_expand_names_every_run():
    runs = quality.expand(TINY)
    assert [r.name for r in runs] == [
        "mqar-num_pairs2-dense",
        "mqar-num_pairs2-blockwise",
        "mqar-num_pairs3-dense",
        "mqar-num_pairs3-blockwise",
        "long_range-distance4-dense",
        "long_range-distance4-blockwise",
    ]
    assert runs[1].config.options == {"block_q": 8} and runs[0].config.options == {}


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_grid_runs_resumes_and_reports(tmp_path):
    grid = [{"task": "mqar", "seq_len": 16, "num_pairs": [2]}]
    preset = {**TINY, "methods": ["dense"], "grid": grid}
    rows = quality.run_grid(preset, tmp_path, log=lambda s: None)
    assert [r["status"] for r in rows] == ["ok"]
    assert 0.0 <= rows[0]["accuracy"] <= 1.0
    again = quality.run_grid(preset, tmp_path, log=lambda s: None)  # everything finished
    assert again == rows
    quality.write_report(tmp_path, preset)
    md = (tmp_path / "report.md").read_text()
    assert "| method | num_pairs=2 |" in md and "| dense |" in md
    tex = (tmp_path / "report.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "accuracy.pdf").stat().st_size > 0


def test_failing_run_is_a_row(tmp_path):
    preset = {**TINY, "methods": ["dense"], "options": {"dense": {"nope": 1}}}
    preset["grid"] = [{"task": "mqar", "seq_len": 16, "num_pairs": [2]}]
    rows = quality.run_grid(preset, tmp_path, log=lambda s: None)
    assert rows[0]["status"] == "error" and "unknown option" in rows[0]["message"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["name"] == "mqar-num_pairs2-dense"


def test_preset_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one list-valued task field"):
        quality.expand({"grid": [{"task": "mqar", "seq_len": [16, 32], "num_pairs": [2, 3]}]})
    with pytest.raises(ValueError, match="unknown method"):
        quality.expand({**TINY, "methods": ["nope"]})
    with pytest.raises(ValueError, match="no quality preset"):
        quality.load_preset(tmp_path / "missing.toml")


def test_shipped_preset_expands():
    preset = quality.load_preset("experiments/quality.toml")
    runs = quality.expand(preset, ["dense", "local"])
    assert len(runs) == 10  # 2 methods x (2 distances + 2 + 1 MQAR pair counts)
    assert {r.config.options.get("window") for r in runs if r.method == "local"} == {16}
