"""Attention maps of models and trained runs (``efficient-attn plot-attention``)."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from efficient_attn.nn import DecoderLM, EncoderDecoder, ModelConfig, MultiHeadAttention
from efficient_attn.train import TrainConfig, Trainer, train
from efficient_attn.train.analysis import attention_maps, example_maps, plot_run


def test_maps_of_a_layer_are_its_weights():
    layer = MultiHeadAttention(num_heads=2, head_dim=4, causal=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    params = layer.init(jax.random.PRNGKey(1), x)
    maps = attention_maps(layer, params, x)
    assert list(maps) == [""]
    expected = layer.apply(params, x, method=MultiHeadAttention.weights)
    np.testing.assert_allclose(np.asarray(maps[""]), np.asarray(expected), rtol=1e-6)


@pytest.mark.parametrize("method", ["dense", "additive"])
def test_decoder_lm_maps_every_layer(method):
    model = DecoderLM(ModelConfig(vocab_size=16, max_len=8, d_model=16, method=method))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 8), 0, 16)
    params = model.init(jax.random.PRNGKey(1), tokens)
    maps = {k: np.asarray(v) for k, v in attention_maps(model, params, tokens).items()}
    assert list(maps) == ["block_0/attention", "block_1/attention"]
    for w in maps.values():
        assert w.shape == (3, 2, 8, 8)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-4)
        assert np.abs(np.triu(w, 1)).max() < 1e-6  # causal
    assert not np.allclose(maps["block_0/attention"], maps["block_1/attention"])


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_encoder_decoder_maps_all_three_attentions():
    model = EncoderDecoder(ModelConfig(vocab_size=11, max_len=8, d_model=16, num_layers=1))
    sources = jax.random.randint(jax.random.PRNGKey(0), (2, 7), 1, 11)
    inputs = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 1, 11)
    params = model.init(jax.random.PRNGKey(2), sources, inputs)
    maps = {k: np.asarray(v) for k, v in attention_maps(model, params, sources, inputs).items()}
    assert list(maps) == [
        "encoder_0/self_attention",
        "decoder_0/self_attention",
        "decoder_0/cross_attention",
    ]
    encoder, decoder, cross = maps.values()
    assert encoder.shape == (2, 2, 7, 7) and np.triu(encoder, 1).max() > 0.01  # bidirectional
    assert decoder.shape == (2, 2, 5, 5) and np.abs(np.triu(decoder, 1)).max() < 1e-6
    assert cross.shape == (2, 2, 5, 7) and cross.min() > 0  # every output sees every source
    np.testing.assert_allclose(cross.sum(-1), 1.0, rtol=1e-5)


def _config(**kw) -> TrainConfig:
    base = {"batch_size": 4, "steps": 2, "log_every": 1, "eval_every": 2, "eval_batches": 1}
    base |= {"checkpoint_every": 2, "warmup_steps": 1, "d_model": 16}
    return TrainConfig.for_task(**{**base, **kw})


@pytest.fixture(scope="module")
def mqar_run(tmp_path_factory):
    """A trained decoder-only run: two layers of an approximate method."""
    config = _config(task="mqar", seq_len=12, num_pairs=2, method="performer", num_layers=2)
    out = tmp_path_factory.mktemp("mqar")
    train(config, out, progress=False)
    return config, out


@pytest.fixture(scope="module")
def reverse_run(tmp_path_factory):
    """An encoder-decoder run directory holding its initial state as checkpoint 0.

    (``tests/test_seq2seq.py`` trains one end to end; this skips compiling the steps.)
    """
    config = _config(task="reverse", seq_len=6, method="additive")
    out = tmp_path_factory.mktemp("reverse")
    trainer = Trainer(config, out)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    manager = trainer.checkpoint_manager()
    manager.save(0, args=ocp.args.StandardSave(trainer.init_state()), force=True)
    manager.wait_until_finished()
    manager.close()
    return config, out


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_plot_attention_of_a_decoder_only_run(mqar_run):
    from efficient_attn.cli import main

    config, out = mqar_run
    argv = ["plot-attention", str(out), "--example", "3", "--layer", "1", "--head", "0"]
    assert main(argv) == 0
    names = sorted(p.name for p in (out / "attention").iterdir())
    assert names == ["ex3-block_1-attention-head0.pdf", "ex3-block_1-attention-head0.png"]
    assert (out / "attention" / names[0]).stat().st_size > 1000
    # Query rows show the answer at the scored positions: "key->value", once per pair.
    trainer = Trainer(config, out)
    manager = trainer.checkpoint_manager()
    state = trainer.restore(manager)
    manager.close()
    maps = example_maps(trainer, state["params"], 1)
    assert [m.name for m in maps] == ["block_0/attention", "block_1/attention"]
    assert sum("->" in label for label in maps[0].query_labels) == config.num_pairs
    assert maps[0].weights.shape == (config.num_heads, 12, 12)


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_plot_attention_of_an_encoder_decoder_run(reverse_run):
    _, out = reverse_run
    written = plot_run(out)  # every layer and head
    assert [p.name for p in written] == [
        "ex0-encoder_0-self_attention.png",
        "ex0-decoder_0-self_attention.png",
        "ex0-decoder_0-cross_attention.png",
    ]
    assert all(p.with_suffix(".pdf").stat().st_size > 1000 for p in written)


@pytest.mark.slow  # end-to-end (minutes of CPU in the default suite); -m slow runs it
def test_plot_attention_errors(mqar_run, tmp_path, capsys):
    from efficient_attn.cli import main

    _, out = mqar_run
    with pytest.raises(ValueError, match=r"--layer=2 is out of range: valid layers are 0\.\.1"):
        plot_run(out, layer=2)
    with pytest.raises(ValueError, match=r"--head=-1 is out of range: valid heads are 0\.\.1"):
        plot_run(out, head=-1)
    with pytest.raises(ValueError, match=r"--example=4 is out of range: .* are 0\.\.3"):
        plot_run(out, example=4)
    with pytest.raises(ValueError, match=r"has no config\.json"):
        plot_run(tmp_path)
    assert main(["plot-attention", str(out), "--layer", "7"]) == 2
    assert "valid layers are 0..1" in capsys.readouterr().err
