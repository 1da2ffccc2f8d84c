"""Sequence-to-sequence tasks, the encoder-decoder with every method, greedy decoding, training."""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.nn import EncoderDecoder, ModelConfig, greedy_decode
from efficient_attn.tasks import BOS, Reverse, Sort, make_task
from efficient_attn.train import (
    TASK_DEFAULTS,
    TrainConfig,
    add_arguments,
    config_from_args,
)
from tests.conftest import method_params


def test_reverse_batch_targets_are_the_reversed_source():
    task = Reverse(seq_len=9, vocab_size=7)
    b = task.batch(seed=2, step=5, batch_size=6)
    sources, inputs, targets, mask = (np.asarray(x) for x in b)
    assert sources.shape == inputs.shape == targets.shape == mask.shape == (6, 9)
    assert sources.min() >= 1 and sources.max() <= 6  # BOS never in the source
    np.testing.assert_array_equal(targets, sources[:, ::-1])
    np.testing.assert_array_equal(inputs[:, 0], BOS)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    assert mask.all()
    np.testing.assert_array_equal(np.asarray(task.batch(2, 5, 6).sources), sources)
    assert not np.array_equal(np.asarray(task.batch(2, 6, 6).sources), sources)
    assert not np.array_equal(np.asarray(task.batch(3, 5, 6).sources), sources)


def test_sort_batch_targets_are_the_sorted_source():
    sources, inputs, targets, _ = (np.asarray(x) for x in Sort(seq_len=12).batch(0, 0, 5))
    np.testing.assert_array_equal(targets, np.sort(sources, axis=1))
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


def test_seq2seq_task_errors_and_registry():
    assert make_task("reverse", seq_len=5).seq_len == 5
    assert make_task("reverse").kind == "seq2seq" and make_task("mqar").kind == "lm"
    with pytest.raises(ValueError, match="seq_len=1 must be >= 2"):
        make_task("reverse", seq_len=1)
    with pytest.raises(ValueError, match="vocab_size=2 must be >= 3"):
        make_task("sort", vocab_size=2)
    with pytest.raises(ValueError, match="has no setting"):
        make_task("reverse", num_pairs=3)
    with pytest.raises(ValueError, match="valid tasks: mqar, long_range, listops, reverse, sort"):
        make_task("nope")


def _model(method="dense", **kw) -> EncoderDecoder:
    config = {"vocab_size": 11, "max_len": 8, "d_model": 16, "num_layers": 1, "num_heads": 2}
    return EncoderDecoder(ModelConfig(method=method, **{**config, **kw}))


@pytest.mark.slow  # the reverse-task CLI test trains and decodes this model by default
@pytest.mark.parametrize("method", method_params(fast=("additive",)))
def test_encoder_decoder_shapes_and_causality(method):
    """Logits [B, T, V] with S != T; the decoder is causal and every output sees the source."""
    if ea.get_method(method).causal_only:
        pytest.skip(
            f"{method} is a causal recurrence: it cannot be the encoder's or the cross attention"
        )
    model = _model(method, num_kv_heads=1)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    sources = jax.random.randint(k1, (2, 7), 1, 11)  # S = 7
    inputs = jax.random.randint(k2, (2, 5), 1, 11)  # T = 5
    params = model.init(jax.random.PRNGKey(1), sources, inputs)
    # One call: the batch, then a later decoder input changed, then the last source token.
    all_sources = jnp.concatenate([sources, sources, sources.at[:, -1].set(0)])
    all_inputs = jnp.concatenate([inputs, inputs.at[:, 3].set(0), inputs])
    logits, later, source = np.split(np.asarray(model.apply(params, all_sources, all_inputs)), 3)
    assert logits.shape == (2, 5, 11) and np.isfinite(logits).all()
    np.testing.assert_allclose(later[:, :3], logits[:, :3], rtol=1e-5, atol=1e-5)
    assert np.abs(later[:, 3:] - logits[:, 3:]).max() > 1e-4
    assert (np.abs(source - logits).max(axis=(0, 2)) > 1e-5).all()


def test_greedy_decode_is_deterministic_and_self_consistent():
    """Teacher forcing on the greedy outputs reproduces them (the decoder is causal)."""
    model = _model(num_layers=2)
    task = Reverse(seq_len=8, vocab_size=11)
    batch = task.batch(0, 0, 4)
    params = model.init(jax.random.PRNGKey(3), batch.sources, batch.inputs)
    decode = jax.jit(functools.partial(greedy_decode, model, length=8, bos=BOS))
    out = np.asarray(decode(params, batch.sources))
    assert out.shape == (4, 8) and out.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(decode(params, batch.sources)), out)
    forced = np.concatenate([np.full((4, 1), BOS), out[:, :-1]], axis=1)
    argmax = np.asarray(jnp.argmax(model.apply(params, batch.sources, forced), -1))
    np.testing.assert_array_equal(argmax, out)


def _parse(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_task_defaults_apply_unless_a_flag_is_given():
    config = _parse(["--task", "reverse", "--method", "local"])
    for field, value in TASK_DEFAULTS["reverse"].items():
        assert getattr(config, field) == value, field
    assert config.method == "local"
    assert _parse(["--task", "reverse", "--steps", "7"]).steps == 7
    assert _parse(["--task", "reverse", "--lr", "0.5"]).learning_rate == 0.5
    assert _parse(["--task", "mqar"]) == TrainConfig()
    assert TrainConfig.for_task("reverse", seq_len=5).seq_len == 5


@pytest.fixture(scope="module")
def reverse_run(tmp_path_factory):
    """A short ``efficient-attn train --task reverse`` run (dense, 150 steps of 6 tokens)."""
    from efficient_attn.cli import main

    out = tmp_path_factory.mktemp("reverse") / "run"
    argv = ["train", "--task", "reverse", "--seq-len", "6", "--vocab-size", "8", "--d-model", "32"]
    argv += ["--steps", "150", "--warmup", "10", "--batch-size", "32", "--eval-every", "50"]
    argv += ["--checkpoint-every", "150", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_train_cli_reverse_writes_alignment_and_greedy_accuracy(reverse_run):
    final = json.loads((reverse_run / "final.json").read_text())
    assert final["step"] == 150 and final["accuracy_metric"] == "eval_greedy_accuracy"
    assert final["accuracy"] == final["eval_greedy_accuracy"]
    assert 0.0 <= final["eval_greedy_exact_match"] <= final["accuracy"] <= 1.0
    assert 0.0 <= final["eval_accuracy"] <= 1.0  # teacher-forced
    assert final["config"]["num_layers"] == TASK_DEFAULTS["reverse"]["num_layers"]
    for ext in ("png", "pdf"):
        assert (reverse_run / f"alignment.{ext}").stat().st_size > 1000


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_training_lowers_the_loss_and_greedy_decoding_learns_to_reverse(reverse_run):
    rows = [json.loads(x) for x in (reverse_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_greedy_accuracy" in r] == [50, 100, 150]
    assert rows[-1]["eval_loss"] < 0.5 * rows[0]["eval_loss"]
    assert rows[-1]["eval_greedy_accuracy"] > 0.9
