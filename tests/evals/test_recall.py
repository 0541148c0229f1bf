"""Recall evals score what the training loss scores, and a perfect associative recaller gets
every MQAR cell and every needle right while a model without memory gets none."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import base
from data import mqar
from errors import ConfigError
from evals import common, recall
from models.registry import build_model

VOCAB = 64


class FirstOccurrenceRecall(nnx.Module):
    """An ideal associative memory with the LM interface: at token t it predicts the token
    that followed the *first* earlier occurrence of x_t (MQAR's context pair, NIAH's needle:
    noise can repeat a key later, but never before its pair). The hidden state is the
    one-hot prediction and the output kernel the identity, so logits = the prediction."""

    def __init__(self, vocab_size, *, copy_current=False):
        self.vocab_size, self.copy_current = vocab_size, copy_current

    def __call__(self, inputs):
        length = inputs.shape[1]
        if self.copy_current:  # no memory at all: predicts the current token again
            return jnp.eye(self.vocab_size)[inputs], {}
        earlier = jnp.arange(length)[None, :] < jnp.arange(length)[:, None]  # [t, j]: j < t
        same = (inputs[:, :, None] == inputs[:, None, :]) & earlier
        first = jnp.argmax(same, axis=-1)  # the first j with x_j = x_t (0 if none)
        following = jnp.take_along_axis(inputs, jnp.minimum(first + 1, length - 1), axis=1)
        prediction = jnp.where(jnp.any(same, axis=-1), following, 0)
        return jnp.eye(self.vocab_size)[prediction], {}

    def output_kernel(self):
        return jnp.eye(self.vocab_size)


def mqar_config(**overrides):
    config = ml_collections.ConfigDict(base.get_config().data.mqar.to_dict())
    config.vocab_size = VOCAB
    config.update(overrides)
    return config


def tiny_lm(vocab_size=VOCAB):
    config = base.get_config()
    config.model.vocab_size, config.model.d_model, config.model.num_heads = vocab_size, 16, 2
    config.model.num_layers, config.model.block_pattern = 1, ("attention",)
    return build_model(config.model, rngs=nnx.Rngs(0))


@nnx.jit
def loss_terms(model, batch):
    return model.loss_terms(batch)


def mqar_batch(seq_len, pairs, count):
    data_config = ml_collections.ConfigDict({"seq_len": seq_len, "mqar": mqar_config().to_dict()})
    data_config.mqar.num_kv_pairs = pairs
    make = mqar.MQARExamples(data_config, seed=mqar.EVAL_SEED, stream=mqar.EVAL_STREAM)
    examples = [make(index) for index in range(count)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def test_token_scores_match_the_training_loss_terms():
    model, batch = tiny_lm(), mqar_batch(32, 4, 5)
    # batch_size 2 < 5 rows: two full batches and a padded one.
    loss, hit = common.token_scores(model, batch["inputs"], batch["targets"], batch_size=2)
    terms = loss_terms(model, batch)
    # Float32 sums of the same 20 cross-entropies in a different order.
    np.testing.assert_allclose(np.sum(loss * batch["mask"]), terms["ce_sum"], rtol=1e-5)
    assert np.sum(hit * batch["mask"]) == terms["correct"]


def test_mqar_sweep_grid_and_accuracy():
    model = tiny_lm()
    result = recall.mqar_sweep(
        model, mqar_config(), seq_lens=[32, 64], num_kv_pairs=[4, 8, 16], num_examples=6
    )
    cells = [(c["seq_len"], c["num_kv_pairs"]) for c in result["cells"]]
    assert cells == [(32, 4), (32, 8), (64, 4), (64, 8), (64, 16)]
    assert [(s["seq_len"], s["num_kv_pairs"]) for s in result["skipped"]] == [(32, 16)]
    # A cell's accuracy is training's eval_accuracy on the same MQAR eval examples.
    batch = mqar_batch(64, 8, 6)
    terms = loss_terms(model, batch)
    cell = result["cells"][3]
    assert cell["accuracy"] == pytest.approx(float(terms["correct"] / terms["count"]))
    assert cell["loss"] == pytest.approx(float(terms["ce_sum"] / terms["count"]), rel=1e-5)


def test_perfect_recall_scores_one_and_no_memory_scores_zero():
    grid = dict(seq_lens=[32, 64], num_kv_pairs=[2, 8], num_examples=8, batch_size=8)
    niah = dict(format="tokens", vocab_size=VOCAB, context_lengths=[16, 48], depths=[0, 0.5, 1])
    oracle = FirstOccurrenceRecall(VOCAB)
    assert all(
        c["accuracy"] == 1.0 for c in recall.mqar_sweep(oracle, mqar_config(), **grid)["cells"]
    )
    cells = recall.niah_grid(oracle, num_examples=8, **niah)["cells"]
    assert len(cells) == 6 and all(c["accuracy"] == c["exact_match"] == 1.0 for c in cells)
    blind = FirstOccurrenceRecall(VOCAB, copy_current=True)
    assert all(
        c["accuracy"] == 0.0 for c in recall.mqar_sweep(blind, mqar_config(), **grid)["cells"]
    )
    cells = recall.niah_grid(blind, num_examples=8, **niah)["cells"]
    assert all(c["accuracy"] == c["exact_match"] == 0.0 for c in cells)


def test_niah_text_format_on_a_byte_model():
    model = tiny_lm(vocab_size=256)
    result = recall.niah_grid(
        model, format="text", vocab_size=256, context_lengths=[40, 96], depths=[0.5],
        num_examples=4, batch_size=4,
    )  # fmt: skip
    assert [s["context_length"] for s in result["skipped"]] == [40]  # shorter than the prompt
    (cell,) = result["cells"]
    assert cell["context_length"] == 96 and 0.0 <= cell["exact_match"] <= cell["accuracy"] <= 1.0
    scalars = recall.summary_scalars("niah", result)
    assert scalars == {
        "recall/niah/T96_depth0.50": cell["accuracy"],
        "recall/niah_mean": cell["accuracy"],
    }


def test_unknown_task_is_a_config_error():
    config = base.get_config()
    with pytest.raises(ConfigError, match="unknown recall task 'copying'"):
        recall.run_task("copying", tiny_lm(), config)
