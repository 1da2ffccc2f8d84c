"""Synthetic tasks, the Flax model with every method, training, checkpoints and resume."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.nn import DecoderLM, ModelConfig, MultiHeadAttention
from efficient_attn.tasks import LongRange, Mqar, make_task
from efficient_attn.train import TrainConfig, Trainer, masked_metrics, train
from efficient_attn.train.loop import steps_per_dispatch
from tests.conftest import method_params


def test_mqar_answers_are_determined_by_the_inputs():
    task = Mqar(seq_len=48, vocab_size=32, num_pairs=6)
    b = task.batch(seed=3, step=7, batch_size=16)
    inputs, targets, mask = (np.asarray(x) for x in b)
    assert mask.sum(axis=1).tolist() == [6] * 16
    for x, y, m in zip(inputs, targets, mask, strict=True):
        pairs = dict(zip(x[0:12:2].tolist(), x[1:12:2].tolist(), strict=True))
        assert len(pairs) == 6 and all(k < 16 <= v for k, v in pairs.items())
        for t in np.flatnonzero(m):
            assert t >= 12 and y[t] == pairs[x[t]]
    again = task.batch(seed=3, step=7, batch_size=16)
    np.testing.assert_array_equal(np.asarray(again.inputs), inputs)
    assert not np.array_equal(np.asarray(task.batch(3, 8, 16).inputs), inputs)


def test_long_range_answer_is_the_token_distance_back():
    task = LongRange(seq_len=40, vocab_size=10, distance=12, num_queries=5)
    inputs, targets, mask = (np.asarray(x) for x in task.batch(0, 0, 8))
    for x, y, m in zip(inputs, targets, mask, strict=True):
        query = np.flatnonzero(m)
        assert query.tolist() == list(range(35, 40)) and (x[query] == 0).all()
        np.testing.assert_array_equal(y[query], x[query - 12])
        assert (x[query - 12] > 0).all()


def test_task_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: mqar, long_range"):
        make_task("nope")
    with pytest.raises(ValueError, match="has no setting"):
        make_task("mqar", distance=4)
    with pytest.raises(ValueError, match="distance \\+ num_queries"):
        make_task("long_range", seq_len=10, distance=8, num_queries=4)


@pytest.mark.parametrize("kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_layer_matches_manual_projection(kv_heads):
    layer = MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=kv_heads, causal=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 16))
    params = layer.init(jax.random.PRNGKey(1), x)
    out = layer.apply(params, x)
    assert out.shape == (2, 10, 16)
    p = params["params"]
    q = jnp.einsum("btd,dnh->btnh", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = jnp.einsum("btd,dnh->btnh", x, p["key"]["kernel"]) + p["key"]["bias"]
    v = jnp.einsum("btd,dnh->btnh", x, p["value"]["kernel"]) + p["value"]["bias"]
    ref = ea.attention(q, k, v, causal=True)
    ref = jnp.einsum("btnh,nhd->btd", ref, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    w = layer.apply(params, x, method=MultiHeadAttention.weights)
    assert w.shape == (2, 4, 10, 10)


@pytest.mark.parametrize("method", method_params(fast=()))  # train CLI test trains dense
def test_model_with_every_method_trains(method):
    """Shapes, and one optimizer step on a batch lowers that batch's loss."""
    config = TrainConfig(
        method=method, seq_len=16, num_pairs=3, d_model=16, num_layers=1, batch_size=16,
        learning_rate=1e-2, warmup_steps=0, kv_heads=1,
    )  # fmt: skip
    trainer = Trainer(config, "/nonexistent")
    state = trainer.init_state()
    batch = trainer.batch(0)
    logits = trainer.model.apply(state["params"], batch.inputs)
    assert logits.shape == (16, 16, 64)
    before = float(masked_metrics(logits, batch)[0])
    for _ in range(3):
        state, metrics = trainer.train_step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    after = float(masked_metrics(trainer.model.apply(state["params"], batch.inputs), batch)[0])
    assert after < before


@pytest.mark.parametrize(
    ("intervals", "expected"),
    [
        ((50, 250, 100, 1000), 50),
        ((2, 6, 4, 12), 2),
        ((500, 500, 500, 1000), 100),
        ((3, 7, 5, 9), 1),
        ((3, 3, 3, 3), 1),  # at most half the run: the second block is timed
        ((6, 6, 6, 6), 3),
    ],
)
def test_steps_per_dispatch_divides_every_interval(intervals, expected):
    log, ev, ckpt, steps = intervals
    config = TrainConfig(log_every=log, eval_every=ev, checkpoint_every=ckpt, steps=steps)
    assert steps_per_dispatch(config) == expected


@pytest.mark.parametrize(
    "fields",
    [{"task": "mqar", "num_pairs": 2}, {"task": "listops", "max_depth": 3, "min_length": 4}],
    ids=["device-batches", "host-batches"],
)
def test_a_block_of_steps_equals_the_steps_one_by_one(fields):
    """train_block's scan (batches made in it, or stacked from the host) is the step loop."""
    config = TrainConfig(seq_len=16, d_model=16, num_layers=1, batch_size=4, warmup_steps=1,
                         **fields)  # fmt: skip
    trainer = Trainer(config, "/nonexistent")
    state = trainer.init_state()
    one_by_one = jax.tree.map(jnp.copy, state)
    losses = []
    for step in range(3, 6):
        one_by_one, metrics = trainer.train_step(one_by_one, trainer.batch(step))
        losses.append(float(metrics["loss"]))
    blocked, metrics = trainer.train_block(state, 3, 3)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), losses, rtol=1e-5)
    pairs = zip(jax.tree_util.tree_leaves_with_path(blocked), jax.tree.leaves(one_by_one),
                strict=True)  # fmt: skip
    for (path, a), b in pairs:
        if "'key']['bias']" in jax.tree_util.keystr(path):
            continue  # softmax ignores it: its gradient is rounding noise, which Adam scales up
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _tiny(**kw) -> TrainConfig:
    base = {
        "seq_len": 16, "num_pairs": 2, "d_model": 16, "num_layers": 1, "batch_size": 8,
        "steps": 12, "log_every": 2, "eval_every": 6, "eval_batches": 2,
        "checkpoint_every": 4, "keep_checkpoints": 2, "warmup_steps": 2,
    }  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_killed_run_resumes_to_the_same_result(tmp_path):
    config = _tiny()
    straight = train(config, tmp_path / "a", progress=False)
    assert train(config, tmp_path / "b", progress=False, stop_after=6) == {}
    assert not (tmp_path / "b" / "final.json").exists()
    ckpts = sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == [4]  # saved every 4 steps; killed after 6 steps
    # A torn last line from the "kill" must not break the resume.
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')
    resumed = train(config, tmp_path / "b", resume=True, progress=False)
    assert resumed["resumed_from"] == 4 and resumed["step"] == 12
    assert resumed["eval_accuracy"] == pytest.approx(straight["eval_accuracy"])
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 13, 2))
    ckpts = sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == [8, 12]  # the last few kept


def test_checkpoint_round_trip(tmp_path):
    config = _tiny(steps=4)
    train(config, tmp_path, progress=False)
    trainer = Trainer(config, tmp_path)
    manager = trainer.checkpoint_manager()
    state = trainer.restore(manager)
    assert int(state["step"]) == 4
    final = json.loads((tmp_path / "final.json").read_text())
    assert trainer.evaluate(state["params"])["eval_loss"] == pytest.approx(final["eval_loss"])
    manager.close()


def test_resume_guards(tmp_path):
    train(_tiny(steps=4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_tiny(steps=4), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"config differs from the saved run in \['method'\]"):
        train(_tiny(steps=4, method="blockwise"), tmp_path, resume=True, progress=False)


def test_train_config_errors():
    with pytest.raises(ValueError, match="unknown method"):
        _tiny(method="nope").validate()
    with pytest.raises(ValueError, match="unknown option"):
        _tiny(options={"nope": 1}).validate()
    with pytest.raises(ValueError, match="multiple of"):
        _tiny(num_heads=2, kv_heads=3).validate()


def test_model_config_defaults_follow_zoology():
    c = ModelConfig()
    assert (c.d_model, c.num_layers, c.num_heads, c.token_shift) == (64, 2, 2, True)
    assert DecoderLM(c).config.method == "dense"


def test_train_cli_writes_metrics_checkpoints_and_final(tmp_path):
    from efficient_attn.cli import main

    out = tmp_path / "run"
    argv = ["train", "--task", "long_range", "--seq-len", "16", "--distance", "6", "--steps", "4"]
    argv += [
        "--num-queries",
        "3",
        "--d-model",
        "16",
        "--layers",
        "1",
        "--batch-size",
        "8",
        "--eval-every",
        "2",
    ]
    argv += ["--checkpoint-every", "2", "--warmup", "1", "--kv-heads", "1", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == 4 and 0.0 <= final["accuracy"] <= 1.0
    assert final["config"]["task"] == "long_range" and final["config"]["kv_heads"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    assert main([*argv, "--out", str(out), "--options", "[1]"]) == 2
