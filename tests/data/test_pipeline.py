"""Batching, determinism, checkpointed state and process sharding of the train/eval pipelines."""

import json

import numpy as np
import pytest

import data
from tests.data.helpers import assert_batches_equal, make_config, take, write_tokens_npy

SEQ_LEN = 8
NUM_WINDOWS = 64  # training windows of the counting corpus below


@pytest.fixture
def counting_config(tmp_path):
    """Tokens 0, 1, 2, ...: a token's value is its position, so batches reveal their windows.

    Sized so the training part holds exactly NUM_WINDOWS windows and the held-out tail
    (eval_fraction of the corpus, here 4 windows' worth) follows it.
    """
    train_tokens = NUM_WINDOWS * SEQ_LEN + 1
    eval_tokens = 4 * SEQ_LEN + 1
    total = train_tokens + eval_tokens
    path = write_tokens_npy(tmp_path, np.arange(total, dtype=np.uint32))
    return make_config(
        name="tokens",
        path=path,
        seq_len=SEQ_LEN,
        vocab_size=total,
        eval_fraction=eval_tokens / total,
    )


def build(config, global_batch_size=8, seed=0, process_index=0, process_count=1):
    return data.build_train_iterator(
        config,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )


@pytest.mark.parametrize("name", ["text", "tokens", "mqar"])
def test_shapes_and_dtypes(name, counting_config):
    config = counting_config if name == "tokens" else make_config(name=name, seq_len=32)
    batch = next(build(config, global_batch_size=6, process_index=1, process_count=2))
    seq_len = config.seq_len
    assert set(batch) == {"inputs", "targets", "mask"}
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (3, seq_len)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["mask"].dtype == np.float32
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < data.vocab_size(config)
    # Next-token targets: targets[t] == inputs[t + 1] wherever the mask is off or for LM.
    if name != "mqar":
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        assert np.all(batch["mask"] == 1.0)


def test_windows_are_consecutive_and_each_epoch_covers_every_target_once(counting_config):
    iterator = build(counting_config, global_batch_size=8)
    epochs = []
    for _ in range(2):
        batches = take(iterator, NUM_WINDOWS // 8)
        inputs = np.concatenate([batch["inputs"] for batch in batches])
        targets = np.concatenate([batch["targets"] for batch in batches])
        # Each window is seq_len consecutive tokens starting at a multiple of seq_len.
        np.testing.assert_array_equal(
            inputs - inputs[:, :1], np.arange(SEQ_LEN)[None, :].repeat(64, 0)
        )
        assert np.all(inputs[:, 0] % SEQ_LEN == 0)
        np.testing.assert_array_equal(
            np.sort(targets.ravel()), np.arange(1, NUM_WINDOWS * SEQ_LEN + 1)
        )
        epochs.append(inputs[:, 0])
    # Shuffled, and reshuffled differently in the second epoch.
    assert not np.array_equal(epochs[0], np.sort(epochs[0]))
    assert not np.array_equal(epochs[0], epochs[1])


def test_determinism_and_seed(counting_config):
    first = take(build(counting_config, seed=3), 10)
    assert_batches_equal(first, take(build(counting_config, seed=3), 10))
    other = take(build(counting_config, seed=4), 10)
    assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])


@pytest.mark.parametrize("name", ["tokens", "mqar"])
@pytest.mark.parametrize("steps_before", [0, 5, 9])  # 9 crosses the epoch boundary at 8
def test_state_round_trip_through_json(name, steps_before, counting_config):
    config = counting_config if name == "tokens" else make_config(name="mqar", seq_len=32)
    uninterrupted = build(config, seed=7)
    take(uninterrupted, steps_before)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    expected = take(uninterrupted, 6)

    restored = build(config, seed=7)
    take(restored, 2)  # a restored iterator may have been advanced before set_state
    restored.set_state(state)
    assert_batches_equal(expected, take(restored, 6))
    assert restored.get_state() == uninterrupted.get_state()


@pytest.mark.parametrize("name", ["text", "tokens", "mqar"])
def test_process_slices_concatenate_to_the_global_batch(name, counting_config):
    config = counting_config if name == "tokens" else make_config(name=name, seq_len=32)
    single = take(build(config, global_batch_size=8, seed=1), 12)
    shards = [
        take(build(config, global_batch_size=8, seed=1, process_index=p, process_count=2), 12)
        for p in range(2)
    ]
    for step, global_batch in enumerate(single):
        for key in global_batch:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, global_batch[key])


def test_state_is_portable_across_process_counts(counting_config):
    single = build(counting_config, global_batch_size=8, seed=2)
    take(single, 3)
    state = single.get_state()
    expected = next(single)
    parts = []
    for process_index in range(4):
        shard = build(
            counting_config,
            global_batch_size=8,
            seed=2,
            process_index=process_index,
            process_count=4,
        )
        shard.set_state(state)
        parts.append(next(shard)["inputs"])
    np.testing.assert_array_equal(np.concatenate(parts), expected["inputs"])


@pytest.mark.parametrize("name", ["tokens", "mqar"])
def test_eval_batches_fixed_and_sharded(name, counting_config):
    config = counting_config if name == "tokens" else make_config(name="mqar", seq_len=32)

    def eval_batches(process_index=0, process_count=1):
        return data.build_eval_batches(
            config,
            global_batch_size=4,
            num_batches=3,
            process_index=process_index,
            process_count=process_count,
        )

    batches = eval_batches()
    assert len(batches) == 3 and batches[0]["inputs"].shape == (4, 32 if name == "mqar" else 8)
    assert_batches_equal(batches, eval_batches())
    halves = [eval_batches(p, 2) for p in range(2)]
    for step in range(3):
        joined = np.concatenate([halves[0][step]["inputs"], halves[1][step]["inputs"]])
        np.testing.assert_array_equal(joined, batches[step]["inputs"])


def test_held_out_tail_is_disjoint_from_training(counting_config):
    train_inputs = np.concatenate(
        [np.concatenate([b["inputs"], b["targets"]]) for b in take(build(counting_config), 8)]
    )
    eval_batches = data.build_eval_batches(
        counting_config, global_batch_size=4, num_batches=2, process_index=0, process_count=1
    )
    eval_tokens = np.concatenate(
        [np.concatenate([b["inputs"], b["targets"]]) for b in eval_batches]
    )
    split = NUM_WINDOWS * SEQ_LEN + 1  # tokens 0 .. split-1 are the training part
    assert train_inputs.max() == split - 1
    assert eval_tokens.min() == split
    # 4 held-out windows cycled over 8 eval rows, in order.
    starts = np.concatenate([b["inputs"][:, 0] for b in eval_batches])
    np.testing.assert_array_equal(starts, split + SEQ_LEN * np.array([0, 1, 2, 3, 0, 1, 2, 3]))


def test_eval_path_is_used_whole_and_training_keeps_everything(tmp_path, counting_config):
    eval_path = write_tokens_npy(tmp_path, np.arange(1000, 1017, dtype=np.uint32), "eval.npy")
    counting_config.eval_path = eval_path
    counting_config.vocab_size = 2000
    eval_batches = data.build_eval_batches(
        counting_config, global_batch_size=2, num_batches=1, process_index=0, process_count=1
    )
    np.testing.assert_array_equal(eval_batches[0]["inputs"][:, 0], [1000, 1008])
    # Without a held-out tail the whole corpus trains: (546 - 1) // 8 = 68 windows, one
    # epoch being 17 batches of 4.
    batches = take(build(counting_config, global_batch_size=4), 17)
    starts = np.concatenate([b["inputs"][:, 0] for b in batches])
    np.testing.assert_array_equal(np.sort(starts), SEQ_LEN * np.arange(68))
