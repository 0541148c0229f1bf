"""S-NIAH examples: the needle sits at the requested depth, the answer is the needle's, and
examples are deterministic in (seed, index)."""

import re

import numpy as np
import pytest

from data import niah
from errors import ConfigError

DEPTHS = [0.0, 0.1, 0.5, 0.9, 1.0]


def haystack_length(format, context_length):
    return context_length - niah.overhead(format)


@pytest.mark.parametrize("depth", DEPTHS)
def test_text_needle_at_depth_and_answer_recoverable(depth):
    length = 300
    for index in range(5):
        example = niah.niah_example("text", context_length=length, depth=depth, index=index)
        inputs, targets, mask = example["inputs"], example["targets"], example["mask"]
        assert inputs.shape == targets.shape == mask.shape == (length,)
        np.testing.assert_array_equal(inputs[1:], targets[:-1])  # next-token layout
        start = int(example["needle_start"])
        assert start == round(depth * haystack_length("text", length))
        text = bytes(inputs.astype(np.uint8)).decode()
        match = re.match(r"The pass key is (\d{5})\. ", text[start:])
        assert match, text[start : start + 40]
        assert text.count("The pass key is ") == 2  # the needle and the query's continuation
        assert text.endswith(niah.QUERY.decode() + match.group(1)[:-1])
        # The masked targets are exactly the key's digits: the answer is in the needle.
        answer = bytes(targets[mask == 1].astype(np.uint8)).decode()
        assert answer == match.group(1) == bytes(example["answer"].astype(np.uint8)).decode()
        assert mask.sum() == niah.KEY_DIGITS and mask[-niah.KEY_DIGITS :].all()


@pytest.mark.parametrize("depth", DEPTHS)
def test_tokens_needle_at_depth_and_answer_recoverable(depth):
    vocab, length = 32, 50
    for index in range(20):
        example = niah.niah_example(
            "tokens", context_length=length, depth=depth, index=index, vocab_size=vocab
        )
        inputs, targets, mask = example["inputs"], example["targets"], example["mask"]
        start = int(example["needle_start"])
        assert start == round(depth * haystack_length("tokens", length))
        key, value = inputs[start], targets[start]  # the needle is "key value"
        assert 1 <= key < vocab // 2 <= value < vocab
        assert inputs[-1] == key and np.flatnonzero(mask).tolist() == [length - 1]
        assert targets[-1] == value == example["answer"][0]
        assert np.count_nonzero(inputs == key) == 2  # the needle and the query, nothing else
        assert inputs.min() >= 0 and inputs.max() < vocab


@pytest.mark.parametrize("format", niah.FORMATS)
def test_deterministic_in_seed_and_index(format):
    def example(seed, index):
        return niah.niah_example(
            format, context_length=120, depth=0.3, index=index, seed=seed, vocab_size=256
        )

    for key in ("inputs", "targets", "mask"):
        np.testing.assert_array_equal(example(0, 3)[key], example(0, 3)[key])
    assert not np.array_equal(example(0, 3)["inputs"], example(1, 3)["inputs"])
    assert not np.array_equal(example(0, 3)["inputs"], example(0, 4)["inputs"])
    batch = niah.niah_batch(
        format, context_length=120, depth=0.3, indices=[3, 4], seed=0, vocab_size=256
    )
    np.testing.assert_array_equal(batch["inputs"][1], example(0, 4)["inputs"])


def test_shortest_context_has_no_filler():
    for format in niah.FORMATS:
        length = niah.overhead(format)
        example = niah.niah_example(format, context_length=length, depth=0.5, index=0)
        assert int(example["needle_start"]) == 0 and len(example["inputs"]) == length


@pytest.mark.parametrize(
    "format, kwargs, fragment",
    [
        ("bytes", dict(context_length=100, depth=0.5), "niah format"),
        ("text", dict(context_length=100, depth=1.5), "niah depth"),
        ("text", dict(context_length=20, depth=0.5), "niah context_length"),
        ("tokens", dict(context_length=2, depth=0.5), "niah context_length"),
        ("text", dict(context_length=100, depth=0.5, vocab_size=64), "niah vocab_size"),
        ("tokens", dict(context_length=100, depth=0.5, vocab_size=4), "niah vocab_size"),
    ],
)
def test_bad_arguments_raise_config_error(format, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        niah.niah_example(format, index=0, **kwargs)
