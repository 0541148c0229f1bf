"""Text and token corpora: reading, memory-mapping, and the DataError for each bad input."""

import numpy as np
import pytest

import data
from data import text, tokens
from errors import DataError
from tests.data.helpers import make_config, take, write_tokens_npy


def first_batch(config, global_batch_size=2):
    iterator = data.build_train_iterator(
        config, global_batch_size=global_batch_size, seed=0, process_index=0, process_count=1
    )
    return next(iterator)


def eval_batch(config, global_batch_size=2):
    return data.build_eval_batches(
        config, global_batch_size=global_batch_size, num_batches=1, process_index=0, process_count=1
    )[0]


def test_text_directory_is_read_sorted_recursive_and_joined(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"second")
    (tmp_path / "a.txt").write_bytes(b"first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_bytes(b"third")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / ".hidden").write_bytes(b"never")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(b"never")
    corpus = text.read_corpus(str(tmp_path), "data.path", max_bytes=0)
    assert corpus.read(0, len(corpus)).astype(np.uint8).tobytes() == b"first\0second\0third"
    capped = text.read_corpus(str(tmp_path), "data.path", max_bytes=9)
    assert capped.read(0, len(capped)).astype(np.uint8).tobytes() == b"first\0sec"


def test_text_batches_are_the_file_bytes(tmp_path):
    # 285 random bytes: no 16-byte run repeats, so a window's bytes locate it.
    content = np.random.default_rng(0).integers(0, 256, 285).astype(np.uint8).tobytes()
    (tmp_path / "corpus.txt").write_bytes(content)
    config = make_config(name="text", path=str(tmp_path / "corpus.txt"), seq_len=16)
    batch = first_batch(config)
    for row_inputs, row_targets in zip(batch["inputs"], batch["targets"]):
        start = content.index(bytes(row_inputs.astype(np.uint8)))
        assert start % 16 == 0
        assert bytes(row_targets.astype(np.uint8)) == content[start + 1 : start + 17]
    # The held-out tail is the last max(1% of 285, 17) = 17 bytes: one window.
    held_out = eval_batch(config)
    assert bytes(held_out["inputs"][0].astype(np.uint8)) == content[-17:-1]
    assert data.vocab_size(config) == 256


def test_default_corpus_is_the_standard_library():
    files = text.default_corpus_files()
    assert files == sorted(files) and all(file.endswith(".py") for file in files)
    corpus = text.read_corpus("", "data.path", max_bytes=1 << 20)
    assert len(corpus) == 1 << 20
    with open(files[0], "rb") as handle:
        head = handle.read(200)
    assert corpus.read(0, len(head)).astype(np.uint8).tobytes() == head
    batch = first_batch(make_config(name="text", seq_len=64), global_batch_size=4)
    assert batch["inputs"].shape == (4, 64)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_tokens_are_memory_mapped(tmp_path, dtype):
    values = np.arange(300, dtype=dtype) * 7  # up to 2093, fits both dtypes
    values[5] = 65535 if dtype == "uint16" else 70000  # a value only the right dtype reads
    path = tmp_path / "train.bin"
    values.tofile(path)
    stream = tokens.read_token_corpus(str(path), "data.path", dtype, vocab_size=70001)
    assert isinstance(stream.parts[0].tokens, np.memmap)
    np.testing.assert_array_equal(stream.read(0, 300), values.astype(np.int64))
    config = make_config(
        name="tokens", path=str(path), token_dtype=dtype, vocab_size=70001, seq_len=10
    )
    batch = first_batch(config, global_batch_size=4)
    starts = batch["inputs"][:, 1] // 7 - 1  # column 1 avoids the patched token 5
    np.testing.assert_array_equal(
        batch["inputs"][:, 2:], values[starts[:, None] + np.arange(2, 10)]
    )


def test_npy_directory_is_one_stream_across_files(tmp_path):
    write_tokens_npy(tmp_path, np.arange(0, 25, dtype=np.int32), "a.npy")
    write_tokens_npy(tmp_path, np.arange(25, 50, dtype=np.int64), "b.npy")
    (tmp_path / "notes.txt").write_text("ignored")
    config = make_config(name="tokens", path=str(tmp_path), vocab_size=50, seq_len=6)
    stream = tokens.read_token_corpus(str(tmp_path), "data.path", "uint16", vocab_size=50)
    np.testing.assert_array_equal(stream.read(20, 30), np.arange(20, 30))  # crosses a file
    # (50 - 7 held out - 1) // 6 = 7 windows; an epoch of 7 batches of 1 sees each once.
    batches = take(
        data.build_train_iterator(
            config, global_batch_size=1, seed=0, process_index=0, process_count=1
        ),
        7,
    )
    starts = sorted(int(batch["inputs"][0, 0]) for batch in batches)
    assert starts == [0, 6, 12, 18, 24, 30, 36]
    np.testing.assert_array_equal(eval_batch(config, 1)["inputs"][0], np.arange(43, 49))


def expect_data_error(match, config):
    with pytest.raises(DataError, match=match):
        first_batch(config)


def test_missing_and_empty_paths(tmp_path):
    missing = str(tmp_path / "nope")
    expect_data_error(f"{missing}: data.path does not exist", make_config(path=missing))
    config = make_config(name="tokens", path=missing, vocab_size=10)
    expect_data_error("data.path does not exist", config)
    config = make_config(name="tokens", path="", vocab_size=10)
    expect_data_error("data.path is empty", config)
    (tmp_path / "empty.txt").write_bytes(b"")
    expect_data_error("holds no text", make_config(path=str(tmp_path)))
    config = make_config(name="tokens", path=str(tmp_path), vocab_size=10)
    expect_data_error(r"directory with no data files \(.bin, .npy\)", config)
    (tmp_path / "empty.bin").write_bytes(b"")
    config = make_config(name="tokens", path=str(tmp_path / "empty.bin"), vocab_size=10)
    expect_data_error("empty.bin: token file is empty", config)
    config = make_config(name="tokens", path=str(tmp_path / "empty.txt"), vocab_size=10)
    expect_data_error("not a file of a supported kind", config)
    config = make_config(path=__file__, eval_path=missing)
    first_batch(config)  # training does not need the eval path
    with pytest.raises(DataError, match="data.eval_path does not exist"):
        eval_batch(config)


def test_bad_token_files(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    config = make_config(name="tokens", path=str(tmp_path / "odd.bin"), vocab_size=10)
    expect_data_error("odd.bin: size 3 bytes is not a multiple of 2", config)
    path = write_tokens_npy(tmp_path, np.zeros((4, 4), np.int32), "matrix.npy")
    config = make_config(name="tokens", path=path, vocab_size=10)
    expect_data_error("matrix.npy: expected a 1-D integer token array", config)
    path = write_tokens_npy(tmp_path, np.arange(100), "big.npy")
    config = make_config(name="tokens", path=path, vocab_size=50, seq_len=8)
    expect_data_error(r"big.npy: token 50 at index 50 is outside \[0, data.vocab_size=50\)", config)
    path = write_tokens_npy(tmp_path, np.full(100, -1), "negative.npy")
    config = make_config(name="tokens", path=path, vocab_size=50, seq_len=8)
    expect_data_error("token -1 at index 0 is outside", config)


def test_bad_token_beyond_the_scanned_prefix_is_caught_when_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "SCAN_TOKENS", 8)
    values = np.zeros(200, np.uint16)
    values[150] = 999
    path = tmp_path / "late.bin"
    values.tofile(path)
    config = make_config(name="tokens", path=str(path), vocab_size=10, seq_len=4)
    iterator = data.build_train_iterator(
        config, global_batch_size=48, seed=0, process_index=0, process_count=1
    )
    with pytest.raises(DataError, match=r"late.bin: token 999 at index 150 is outside"):
        take(iterator, 2)  # 2 batches of 48 cover all 48 training windows


def test_corpus_too_short(tmp_path):
    (tmp_path / "tiny.txt").write_bytes(b"x" * 30)
    config = make_config(path=str(tmp_path / "tiny.txt"), seq_len=16)
    expect_data_error("tiny.txt: 30 tokens, too short for one training and one held-out", config)
    config = make_config(path=str(tmp_path / "tiny.txt"), seq_len=64, eval_path=__file__)
    expect_data_error("the training corpus has 30 tokens, too short for one sequence", config)
    config = make_config(path=__file__, seq_len=64, eval_path=str(tmp_path / "tiny.txt"))
    with pytest.raises(DataError, match="tiny.txt: the eval corpus has 30 tokens"):
        eval_batch(config)
