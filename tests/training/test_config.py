"""Config loading and validation: every config file validates; bad values name their key."""

import glob
import importlib.util
import os

import ml_collections
import pytest

from configs import base
from errors import ConfigError
from training import config_validation

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
CONFIG_FILES = sorted(
    path
    for path in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if not os.path.basename(path).startswith("_")
)


def load_config_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants(module):
    """The variants a config file documents in VARIANTS (default: just the default)."""
    return getattr(module, "VARIANTS", (None,))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads_and_validates(path):
    module = load_config_module(path)
    for variant in variants(module):
        config = module.get_config() if variant is None else module.get_config(variant)
        resolved = config_validation.validate(config, base.get_config())
        assert resolved.model.vocab_size > 0


def validate_with(**overrides):
    config = base.get_config()
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config_validation.validate(config, base.get_config())


def test_unknown_key_is_named_with_a_suggestion():
    config = base.get_config()
    with config.unlocked():
        config.train.num_step = 3
    with pytest.raises(ConfigError, match=r"train.num_step: unknown config key \(did you mean"):
        config_validation.validate(config, base.get_config())


def test_wrong_type_is_named():
    config = base.get_config()
    config.train = ml_collections.ConfigDict(dict(config.train.to_dict(), batch_size="many"))
    with pytest.raises(ConfigError, match="train.batch_size: expected int, got str"):
        config_validation.validate(config, base.get_config())


def test_int_accepted_where_float_expected():
    config = base.get_config()
    config.optim = ml_collections.ConfigDict(dict(config.optim.to_dict(), learning_rate=1))
    config_validation.validate(config, base.get_config())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train__num_steps": 0}, "train.num_steps: must be > 0"),
        ({"train__grad_accum_steps": 3}, "train.batch_size: 16 is not divisible"),
        ({"train__nonfinite": "ignore"}, "train.nonfinite"),
        ({"data__seq_len": -1}, "data.seq_len"),
        ({"eval__every_steps": -5}, "eval.every_steps"),
        ({"optim__name": "sgdd"}, "optim.name: unknown optimizer 'sgdd'"),
        ({"model__name": "nope"}, "model.name: unknown model 'nope'"),
        ({"model__block_pattern": ("attention", "nope")}, "model.block_pattern"),
        ({"model__loss_chunk_size": 100}, "model.loss_chunk_size"),
    ],
)
def test_impossible_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_with(**overrides)


def test_vocab_size_is_resolved_from_the_data():
    config = base.get_config()
    config.model.vocab_size = 0
    config.data.name = "mqar"
    resolved = config_validation.validate(config, base.get_config())
    import data

    assert resolved.model.vocab_size == data.vocab_size(config.data)


def test_run_differences_ignore_resumable_keys():
    old = base.get_config().to_dict()
    new = base.get_config()
    new.train.num_steps = 5
    new.log.every_steps = 1
    assert config_validation.run_differences(old, new.to_dict()) == []
    new.model.d_model = 7
    assert config_validation.run_differences(old, new.to_dict()) == ["model.d_model"]


def test_an_option_added_since_a_run_resumes_at_its_default():
    """A workdir written before the codebase grew an option (its config.json lacks the key)
    resumes while the option is at its default, and is refused once it is not."""
    defaults = base.get_config().to_dict()
    old = base.get_config().to_dict()
    del old["model"]["atlas"]["omega_gates"]  # as written before the option existed
    new = base.get_config()
    assert config_validation.run_differences(old, new.to_dict(), defaults) == []
    assert config_validation.run_differences(old, new.to_dict()) == ["model.atlas.omega_gates"]
    new.model.atlas.omega_gates = "pair"
    changed = config_validation.run_differences(old, new.to_dict(), defaults)
    assert changed == ["model.atlas.omega_gates"]
