"""Shared helpers for the data tests: small configs and batch collection."""

import numpy as np

import data


def make_config(**overrides):
    """The default data config with `overrides` applied (dotted keys reach `mqar`)."""
    config = data.default_config()
    for key, value in overrides.items():
        section = config
        *parents, leaf = key.split("__")
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return config


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(expected, actual):
    assert len(expected) == len(actual)
    for batch_expected, batch_actual in zip(expected, actual):
        assert batch_expected.keys() == batch_actual.keys()
        for key in batch_expected:
            np.testing.assert_array_equal(batch_expected[key], batch_actual[key])


def write_tokens_npy(directory, tokens, name="tokens.npy"):
    path = directory / name
    np.save(path, np.asarray(tokens))
    return str(path)
