"""MQAR examples follow Zoology's `multiquery_ar` format, example by example."""

import numpy as np
import pytest

import data
from data import mqar
from tests.data.helpers import make_config, take


def examples(config, count, seed=0, stream=mqar.TRAIN_STREAM):
    make_example = mqar.MQARExamples(config, seed=seed, stream=stream)
    return [make_example(index) for index in range(count)]


@pytest.mark.parametrize(
    "num_kv_pairs, num_queries, random_non_queries",
    [(8, 0, True), (4, 2, True), (6, 0, False)],
)
def test_structure(num_kv_pairs, num_queries, random_non_queries):
    vocab = 64
    config = make_config(
        name="mqar",
        seq_len=40,
        mqar__vocab_size=vocab,
        mqar__num_kv_pairs=num_kv_pairs,
        mqar__num_queries=num_queries,
        mqar__random_non_queries=random_non_queries,
    )
    expected_queries = num_queries or num_kv_pairs  # 0 = every pair is queried (Zoology)
    context = 2 * num_kv_pairs
    for example in examples(config, 50):
        inputs, targets, mask = example["inputs"], example["targets"], example["mask"]
        keys, values = inputs[0:context:2], inputs[1:context:2]
        assert len(set(keys)) == num_kv_pairs and len(set(values)) == num_kv_pairs
        assert np.all((1 <= keys) & (keys < vocab // 2))
        assert np.all((vocab // 2 <= values) & (values < vocab))
        pair_of = dict(zip(keys.tolist(), values.tolist()))
        positions = np.flatnonzero(mask)
        assert mask.sum() == expected_queries and set(np.unique(mask)) <= {0.0, 1.0}
        # Queries sit on even offsets after the context, each a distinct key.
        assert np.all(positions >= context) and np.all((positions - context) % 2 == 0)
        assert len(set(inputs[positions].tolist())) == expected_queries
        for position in positions:
            assert targets[position] == pair_of[int(inputs[position])]
        # Everywhere else the target is simply the next input token.
        unmasked = np.flatnonzero(mask[:-1] == 0)
        np.testing.assert_array_equal(targets[unmasked], inputs[unmasked + 1])
        fillers = np.ones(len(inputs), bool)
        fillers[:context] = False
        fillers[positions] = False
        if not random_non_queries:
            assert np.all(inputs[fillers] == 0)
        assert inputs.min() >= 0 and inputs.max() < vocab


def test_random_fillers_are_random():
    config = make_config(name="mqar", seq_len=64, mqar__vocab_size=128, mqar__num_kv_pairs=4)
    inputs = np.stack([example["inputs"] for example in examples(config, 20)])
    # 20 x 48 query-region tokens drawn from 128 values: far more than a handful distinct.
    assert len(np.unique(inputs[:, 8:])) > 64


def test_query_gaps_follow_the_power_law():
    """With one query, its gap index g-1 has probability ∝ a·g^(a-1) exactly (Zoology)."""
    power_a, seq_len = 0.3, 42
    config = make_config(
        name="mqar",
        seq_len=seq_len,
        mqar__vocab_size=64,
        mqar__num_kv_pairs=1,
        mqar__power_a=power_a,
    )
    count = 4000
    gaps = np.array([(np.flatnonzero(e["mask"])[0] - 2) // 2 for e in examples(config, count)])
    space = (seq_len - 2) // 2
    weights = power_a * np.arange(1, space + 1) ** (power_a - 1)
    probabilities = weights / weights.sum()
    expected_mean = (probabilities * np.arange(space)).sum()
    standard_error = np.sqrt(
        (probabilities * (np.arange(space) - expected_mean) ** 2).sum() / count
    )
    # 5 standard errors: a fixed-seed draw, so this cannot flake, yet a uniform placement
    # (mean 9.5 here vs ~6.1) or an off-by-one in the gap would fail it by far.
    assert abs(gaps.mean() - expected_mean) < 5 * standard_error
    assert np.mean(gaps == 0) == pytest.approx(probabilities[0], abs=5 * np.sqrt(0.25 / count))


def test_streams_and_seeds_are_distinct_and_reproducible():
    config = make_config(name="mqar", seq_len=32)
    train = examples(config, 3, seed=0, stream=mqar.TRAIN_STREAM)
    again = examples(config, 3, seed=0, stream=mqar.TRAIN_STREAM)
    evaluation = examples(config, 3, seed=0, stream=mqar.EVAL_STREAM)
    other_seed = examples(config, 3, seed=1, stream=mqar.TRAIN_STREAM)
    for a, b, c, d in zip(train, again, evaluation, other_seed):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        assert not np.array_equal(a["inputs"], c["inputs"])
        assert not np.array_equal(a["inputs"], d["inputs"])
    # The pipeline's batches are these examples, in index order.
    iterator = data.build_train_iterator(
        config, global_batch_size=3, seed=0, process_index=0, process_count=1
    )
    batch = take(iterator, 1)[0]
    np.testing.assert_array_equal(batch["inputs"], np.stack([e["inputs"] for e in train]))
    eval_batch = data.build_eval_batches(
        config, global_batch_size=3, num_batches=1, process_index=0, process_count=1
    )[0]
    evaluation = examples(config, 3, seed=mqar.EVAL_SEED, stream=mqar.EVAL_STREAM)
    np.testing.assert_array_equal(
        eval_batch["targets"], np.stack([e["targets"] for e in evaluation])
    )
    assert data.vocab_size(config) == 8192
