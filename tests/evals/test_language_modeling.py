"""Held-out loss and length extrapolation read only held-out tokens, the same ones at every
length, and bucket the loss by position."""

import numpy as np
import pytest
from flax import nnx

from configs import base
from data.windows import Windows
from errors import ConfigError
from evals import common, language_modeling
from models.registry import build_model

SEQ_LEN = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    words = np.random.default_rng(0).choice([b"alpha ", b"beta ", b"gamma\n", b"delta, "], 2000)
    corpus.write_bytes(b"".join(words))
    config = base.get_config()
    config.data.path, config.data.seq_len, config.data.eval_fraction = str(corpus), SEQ_LEN, 0.2
    config.model.vocab_size, config.model.d_model, config.model.num_heads = 256, 16, 2
    config.model.num_layers, config.model.block_pattern = 1, ("attention",)
    return build_model(config.model, rngs=nnx.Rngs(0)), config


def test_held_out_span_is_the_training_split(setup):
    _, config = setup
    stream, start, stop = language_modeling.held_out_span(config.data)
    total = len(stream)
    assert stop == total and start == total - round(0.2 * total)  # the tail training never saw


def test_extrapolation_buckets_and_same_tokens(setup):
    model, config = setup
    result = language_modeling.extrapolation(
        model, config.data, multiples=(1, 2, 4), num_windows=3, batch_size=2
    )
    assert result["unit"] == "bits_per_byte" and result["train_seq_len"] == SEQ_LEN
    stream, start, stop = language_modeling.held_out_span(config.data)
    for row in result["lengths"]:
        multiple = row["multiple"]
        # Every length reads the same 3 * 4 * SEQ_LEN held-out tokens.
        assert row["num_windows"] * row["seq_len"] == 3 * 4 * SEQ_LEN
        assert len(row["bucket_loss"]) == multiple
        # Buckets hold equally many tokens, so their mean is the overall loss.
        assert np.mean(row["bucket_loss"]) == pytest.approx(row["loss"], rel=1e-6)
        assert row["bits_per_token"] == pytest.approx(row["loss"] / np.log(2))
        # The loss is the model's cross-entropy on exactly those held-out windows.
        windows = Windows(stream, start, stop, row["seq_len"], "held out")
        inputs = np.stack([windows(i)["inputs"] for i in range(row["num_windows"])])
        targets = np.stack([windows(i)["targets"] for i in range(row["num_windows"])])
        losses, _ = common.token_scores(model, inputs, targets, batch_size=4)
        assert row["loss"] == pytest.approx(float(losses.mean()), rel=1e-6)
        assert inputs.min() >= 0 and windows.start >= start


def test_length_beyond_the_held_out_data_is_reported(setup):
    model, config = setup
    result = language_modeling.extrapolation(model, config.data, multiples=(1000,), num_windows=1)
    (row,) = result["lengths"]
    assert row["seq_len"] == 16000 and "too short" in row["error"] and "loss" not in row


def test_mqar_run_has_no_corpus(setup):
    _, config = setup
    data_config = config.data.copy_and_resolve_references()
    data_config.name = "mqar"
    with pytest.raises(ConfigError, match="data.name"):
        language_modeling.extrapolation(setup[0], data_config)


def test_document_resets_reach_the_model(setup):
    """With an eos id, each held-out window's documents are scored as if alone (attention
    and positions restart), as the training windows are; without one they are not."""
    model, config = setup
    stream, start, stop = language_modeling.held_out_span(config.data)
    eos, options = ord("\n"), dict(seq_len=SEQ_LEN, num_windows=4, batch_size=2)
    reset = language_modeling.length_losses(model, stream, start, stop, eos_id=eos, **options)
    plain = language_modeling.length_losses(model, stream, start, stop, **options)
    windows = Windows(stream, start, stop, SEQ_LEN, "held out", eos_id=eos)
    split = 0
    for index in range(len(reset)):
        window = windows(index)
        starts = np.flatnonzero(np.diff(window["segment_ids"])) + 1
        for a, b in zip([0, *starts], [*starts, SEQ_LEN]):
            alone, _ = common.token_scores(
                model, window["inputs"][None, a:b], window["targets"][None, a:b], batch_size=1
            )
            np.testing.assert_allclose(reset[index, a:b], alone[0], rtol=1e-5, atol=1e-5)
        split += len(starts)
    assert split > 0 and not np.allclose(reset, plain)  # some window held two documents
