"""The `data` config section: defaults validate, and each bad value names its key."""

import ml_collections
import pytest

import data
from errors import ConfigError
from tests.data.helpers import make_config


def test_defaults_validate_and_vocab_sizes():
    config = data.default_config()
    data.validate(config)
    assert data.vocab_size(config) == 256
    assert data.vocab_size(make_config(name="tokens", vocab_size=50257)) == 50257
    assert data.vocab_size(make_config(name="mqar", mqar__vocab_size=1024)) == 1024


def with_values(**values):
    """A config whose values bypass ConfigDict's own type checks (as a loaded file might)."""
    raw = data.default_config().to_dict()
    for key, value in values.items():
        section = raw
        *parents, leaf = key.split("__")
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return ml_collections.ConfigDict(raw)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"name": "foo"},
            "data.name: unknown dataset 'foo' (choose text, tokens, mqar)",
        ),
        ({"seq_len": 0}, "data.seq_len: must be positive, got 0"),
        ({"seq_len": "256"}, "data.seq_len: expected int, got str '256'"),
        ({"seq_len": True}, "data.seq_len: expected int, got bool True"),
        ({"eval_fraction": 1.5}, "data.eval_fraction: must be in (0, 1), got 1.5"),
        ({"token_dtype": "int8"}, "data.token_dtype: 'int8' (choose uint16, uint32)"),
        ({"max_bytes": -1}, "data.max_bytes: must be >= 0, got -1"),
        ({"name": "tokens"}, "data.vocab_size: must be set (> 0) for data.name='tokens'"),
        ({"vocab_size": 300}, "data.vocab_size: byte-level text has 256 tokens, got 300"),
        ({"extra": 1}, "data.extra: unknown key"),
        ({"mqar__typo": 1}, "data.mqar.typo: unknown key"),
        ({"mqar__random_non_queries": 1}, "data.mqar.random_non_queries: expected bool"),
        (
            {"name": "mqar", "vocab_size": 10},
            "data.vocab_size: 10 disagrees with data.mqar.vocab_size 8192",
        ),
        (
            {"name": "mqar", "mqar__num_queries": 9},
            "data.mqar.num_queries: must be in [0, num_kv_pairs=8], got 9",
        ),
        (
            {"name": "mqar", "mqar__vocab_size": 16},
            "data.mqar.vocab_size: 16 is too small for 8 distinct keys",
        ),
        (
            {"name": "mqar", "seq_len": 31},
            "data.seq_len: 31 is too short for 8 kv pairs and 8 queries (need >= 32)",
        ),
        ({"name": "mqar", "mqar__power_a": 0.0}, "data.mqar.power_a: must be positive"),
    ],
)
def test_bad_values_name_their_key(values, message):
    config = with_values(**values)
    with pytest.raises(ConfigError) as error:
        data.validate(config)
    assert str(error.value).startswith(message)
    # The builders validate before touching any file.
    with pytest.raises(ConfigError):
        data.build_train_iterator(
            config, global_batch_size=4, seed=0, process_index=0, process_count=1
        )


def test_missing_key_is_reported():
    raw = data.default_config().to_dict()
    del raw["max_bytes"]
    with pytest.raises(ConfigError, match=r"^data.max_bytes: missing$"):
        data.validate(ml_collections.ConfigDict(raw))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"global_batch_size": 6, "process_count": 4, "process_index": 0},
            "global_batch_size: 6 is not divisible by process_count 4",
        ),
        (
            {"global_batch_size": 0, "process_count": 1, "process_index": 0},
            "global_batch_size: must be positive, got 0",
        ),
        (
            {"global_batch_size": 4, "process_count": 2, "process_index": 2},
            "process_index 2 is not in [0, process_count=2)",
        ),
    ],
)
def test_bad_sharding_arguments(kwargs, message):
    config = make_config(name="mqar", seq_len=32)
    for build in (data.build_train_iterator, data.build_eval_batches):
        extra = {"seed": 0} if build is data.build_train_iterator else {"num_batches": 1}
        with pytest.raises(ConfigError) as error:
            build(config, **kwargs, **extra)
        assert str(error.value) == message
    with pytest.raises(ConfigError, match="seed: must be in"):
        data.build_train_iterator(
            config, global_batch_size=4, seed=-1, process_index=0, process_count=1
        )
