"""`python -m data.prepare`: tokenizing local corpora into train.bin / eval.bin / meta.json,
and the pipeline reading the result (vocabulary, dtype, splits, segment ids at eos)."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
from data import prepare, prepared
from errors import ConfigError, DataError
from tests.data.helpers import make_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Short English documents with non-ASCII text, so the byte-level round trip is exercised.
DOCUMENTS = [
    f"Document {i}: the memory is a small network trained while the sequence streams past. "
    f"Naïve café résumé — {i * 7} tokens, “quoted” and ünïcödé. " * (2 + i % 3)
    for i in range(40)
]


def write_text_files(directory, texts):
    directory.mkdir()
    for index, text in enumerate(texts):
        (directory / f"doc{index:03d}.txt").write_text(text, encoding="utf-8")
    return directory


def read_split(out, split, meta):
    return np.fromfile(prepared.split_file(str(out), split), dtype=meta.dtype)


def documents_of(tokens, eos):
    """Token ids -> one list per eos-terminated document."""
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[start:end] for start, end in zip(starts, ends)]


def no_partial_dirs(parent):
    return not [name for name in os.listdir(parent) if ".partial-" in name]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A BPE of 400 ids trained on DOCUMENTS (as 40 text files), and its output dir."""
    root = tmp_path_factory.mktemp("prepare")
    inputs = write_text_files(root / "texts", DOCUMENTS)
    out = root / "bpe"
    meta = prepare.prepare(str(inputs), str(out), vocab_size=400, eval_fraction=0.1)
    return inputs, out, meta


def test_bpe_corpus_round_trips_every_document_in_order(corpus):
    _, out, meta = corpus
    assert sorted(os.listdir(out)) == ["eval.bin", "meta.json", "tokenizer.json", "train.bin"]
    tokenizer = prepare.load_tokenizer(str(out / "tokenizer.json"))
    assert meta.vocab_size == tokenizer.get_vocab_size() <= 400 and meta.dtype == "uint16"
    assert tokenizer.id_to_token(meta.eos_id) == prepare.EOS_TOKEN
    train, held_out = read_split(out, "train", meta), read_split(out, "eval", meta)
    assert (len(train), len(held_out)) == (meta.train_tokens, meta.eval_tokens)
    assert train[-1] == held_out[-1] == meta.eos_id  # both splits end at a document end
    decoded = [tokenizer.decode(doc.tolist()) for doc in documents_of(train, meta.eos_id)]
    decoded += [tokenizer.decode(doc.tolist()) for doc in documents_of(held_out, meta.eos_id)]
    assert decoded == DOCUMENTS
    # The held-out tail: the fewest last documents holding >= 10% of the tokens.
    total, held_out_docs = meta.train_tokens + meta.eval_tokens, documents_of(held_out, meta.eos_id)
    assert meta.train_documents + meta.eval_documents == len(DOCUMENTS)
    assert meta.eval_documents == len(held_out_docs) >= 2
    assert meta.eval_tokens >= 0.1 * total > meta.eval_tokens - len(held_out_docs[0]) - 1
    assert meta.train_bytes + meta.eval_bytes == sum(len(d.encode()) for d in DOCUMENTS)
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["format"] == prepared.FORMAT and prepared.read_meta(str(out)) == meta


def test_a_given_tokenizer_encodes_jsonl_and_parquet_alike(corpus, tmp_path):
    _, out, meta = corpus
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": text, "id": i}) + "\n"
                             for i, text in enumerate(DOCUMENTS)))  # fmt: skip
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": DOCUMENTS}), parquet, row_group_size=7)
    tokenizer = str(out / "tokenizer.json")
    from_jsonl = prepare.prepare(str(jsonl), str(tmp_path / "a"), tokenizer_file=tokenizer,
                                 text_field="body", eval_fraction=0.1)  # fmt: skip
    from_parquet = prepare.prepare(str(parquet), str(tmp_path / "b"), tokenizer_file=tokenizer,
                                   text_field="body", eval_fraction=0.1)  # fmt: skip
    for split in ("train", "eval"):
        expected = read_split(out, split, meta)
        np.testing.assert_array_equal(read_split(tmp_path / "a", split, from_jsonl), expected)
        np.testing.assert_array_equal(read_split(tmp_path / "b", split, from_parquet), expected)
    assert from_jsonl.tokenizer == os.path.abspath(tokenizer)


def test_one_long_document_is_cut_at_lines_and_split_by_tokens(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(60000))  # ~1.8 MB
    (tmp_path / "book.txt").write_text(text)
    assert len(prepare.pieces(text)) == 2 and "".join(prepare.pieces(text)) == text
    meta = prepare.prepare(str(tmp_path / "book.txt"), str(tmp_path / "out"), vocab_size=300)
    tokenizer = prepare.load_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    tokens = np.concatenate([read_split(tmp_path / "out", s, meta) for s in ("train", "eval")])
    assert tokens[-1] == meta.eos_id and tokenizer.decode(tokens[:-1].tolist()) == text
    assert meta.eval_tokens == round(0.01 * len(tokens))


def test_dtype_follows_the_vocabulary_size():
    assert prepare.dtype_for(65536) == "uint16" and prepare.dtype_for(65537) == "uint32"
    assert prepare.dtype_for(300, "uint32") == "uint32"
    with pytest.raises(ConfigError, match="--dtype: uint16 cannot hold a vocabulary of 70000"):
        prepare.dtype_for(70000, "uint16")


def test_a_vocabulary_over_uint16_is_written_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(70000)} | {"[UNK]": 70000, prepare.EOS_TOKEN: 70001}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "big.json"))
    (tmp_path / "in.txt").write_text("w1 w69999 w5 " * 20)
    meta = prepare.prepare(str(tmp_path / "in.txt"), str(tmp_path / "out"),
                           tokenizer_file=str(tmp_path / "big.json"))  # fmt: skip
    assert (meta.vocab_size, meta.dtype, meta.eos_id) == (70002, "uint32", 70001)
    assert 69999 in read_split(tmp_path / "out", "train", meta)
    with pytest.raises(ConfigError, match="uint16 cannot hold"):
        prepare.prepare(str(tmp_path / "in.txt"), str(tmp_path / "out16"),
                        tokenizer_file=str(tmp_path / "big.json"), dtype="uint16")  # fmt: skip
    assert not (tmp_path / "out16").exists()


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("empty", "holds no text"),
        ("bad_tokenizer", "not a loadable tokenizer.json"),
        ("not_empty_output", "exists and is not an empty directory"),
        ("missing_field", "no 'text' field (set --text_field)"),
        ("bad_json", ":2: not a JSON object"),
        ("not_utf8", "not UTF-8 text"),
        ("missing_eos", "--eos_token: '<eos>' is not in the vocabulary"),
        ("both_or_neither", "exactly one of --vocab_size"),
        ("tiny_vocab", "--vocab_size: must be >= 257"),
    ],
)
def test_bad_input_is_one_error_and_nothing_written(corpus, tmp_path, case, fragment):
    _, out, _ = corpus
    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    options = dict(vocab_size=300)
    (source / "a.txt").write_text("some text")
    if case == "empty":
        (source / "a.txt").write_text("")
        (source / "b.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    elif case == "bad_tokenizer":
        (tmp_path / "tok.json").write_text('{"not": "a tokenizer"}')
        options = dict(tokenizer_file=str(tmp_path / "tok.json"))
    elif case == "not_empty_output":
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    elif case == "missing_field":
        (source / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    elif case == "bad_json":
        (source / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n{oops\n")
    elif case == "not_utf8":
        (source / "b.txt").write_bytes(b"caf\xe9")
    elif case == "missing_eos":
        options = dict(tokenizer_file=str(out / "tokenizer.json"), eos_token="<eos>")
    elif case == "both_or_neither":
        options = dict(vocab_size=300, tokenizer_file=str(out / "tokenizer.json"))
    elif case == "tiny_vocab":
        options = dict(vocab_size=100)
    with pytest.raises(
        (DataError, ConfigError), match=fragment.replace("(", r"\(").replace(")", r"\)")
    ):
        prepare.prepare(str(source), str(output), **options)
    assert no_partial_dirs(tmp_path)
    if case == "not_empty_output":
        assert os.listdir(output) == ["keep.txt"]
    else:
        assert not output.exists()


def test_cli_prints_a_summary_and_errors_are_one_line(corpus, tmp_path):
    inputs, _, _ = corpus
    ok = subprocess.run(
        [sys.executable, "-m", "data.prepare", f"--input={inputs}", f"--output={tmp_path / 'o'}",
         "--vocab_size=300"], cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "training tokens (" in ok.stdout and "eos id 0, uint16" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "data.prepare", f"--input={tmp_path / 'nowhere'}",
         f"--output={tmp_path / 'p'}", "--vocab_size=300"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nowhere: --input does not exist" in bad.stderr


# ---- the pipeline on a prepared directory --------------------------------------------------


def test_pipeline_reads_vocabulary_dtype_and_splits_from_meta(corpus):
    _, out, meta = corpus
    config = make_config(name="tokens", path=str(out), seq_len=16, token_dtype="uint32")
    assert data.vocab_size(config) == meta.vocab_size  # data.vocab_size 0: meta.json's
    train = next(data.build_train_iterator(config, global_batch_size=64, seed=0,
                                           process_index=0, process_count=1))  # fmt: skip
    held_out = data.build_eval_batches(config, global_batch_size=8, num_batches=1,
                                       process_index=0, process_count=1)[0]  # fmt: skip
    train_tokens = set(read_split(out, "train", meta).tolist())
    assert set(train["inputs"].ravel().tolist()) <= train_tokens  # read as uint16, not uint32
    expected = read_split(out, "eval", meta)[:17]
    np.testing.assert_array_equal(held_out["inputs"][0], expected[:16])  # eval.bin, in order
    np.testing.assert_array_equal(held_out["targets"][0], expected[1:])
    with pytest.raises(ConfigError, match="data.vocab_size: 123 disagrees with"):
        data.validate(make_config(name="tokens", path=str(out), vocab_size=123))


def test_windows_start_a_segment_at_every_eos_input(corpus):
    _, out, meta = corpus
    config = make_config(name="tokens", path=str(out), seq_len=64)
    batch = next(data.build_train_iterator(config, global_batch_size=32, seed=0,
                                           process_index=0, process_count=1))  # fmt: skip
    inputs, segments = batch["inputs"], batch["segment_ids"]
    assert segments.dtype == np.int32 and (segments[:, 0] == (inputs[:, 0] == meta.eos_id)).all()
    starts = np.diff(segments, axis=1) == 1
    np.testing.assert_array_equal(starts, inputs[:, 1:] == meta.eos_id)
    assert starts.any() and (np.diff(segments, axis=1) >= 0).all()
    config.document_resets = False
    plain = next(data.build_train_iterator(config, global_batch_size=32, seed=0,
                                           process_index=0, process_count=1))  # fmt: skip
    assert "segment_ids" not in plain
    np.testing.assert_array_equal(plain["inputs"], inputs)


def test_raw_token_files_take_an_eos_id(tmp_path):
    tokens = np.array([5, 6, 1, 7, 8, 9, 1, 4] * 20, np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    config = make_config(name="tokens", path=str(tmp_path / "t.bin"), vocab_size=10, seq_len=8,
                         eos_id=1, eval_fraction=0.2)  # fmt: skip
    batch = data.build_eval_batches(config, global_batch_size=2, num_batches=1,
                                    process_index=0, process_count=1)[0]  # fmt: skip
    np.testing.assert_array_equal(batch["segment_ids"][0], np.cumsum(batch["inputs"][0] == 1))
    with pytest.raises(ConfigError, match="data.eos_id: 10 is not < data.vocab_size 10"):
        data.validate(make_config(name="tokens", path="x.bin", vocab_size=10, eos_id=10))
