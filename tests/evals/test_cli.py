"""The eval hooks of train.py and the eval command lines, on real workdirs (Orbax checkpoints
written by train.py), in subprocesses."""

import json
import shutil
import subprocess
import sys

import pytest

from data import prepare
from evals import common, language_modeling, recall
from tests.data.test_prepare import DOCUMENTS, write_text_files
from tests.training.test_train_cli import (
    REPO,
    TINY,
    assert_one_line_error,
    environment,
    read_metrics,
)


def run(*command, devices=1, timeout=300):
    return subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env=environment(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def mqar_workdir(tmp_path_factory):
    """4 steps of a 1-layer Gated DeltaNet on MQAR, with both hooks at step 4."""
    workdir = tmp_path_factory.mktemp("mqar")
    result = run(
        "train.py",
        *TINY,
        f"--workdir={workdir}",
        "--config.model.block_pattern=('gdn',)",
        "--config.model.num_layers=1",
        "--config.train.num_steps=4",
        "--config.log.every_steps=2",
        "--config.eval.every_steps=0",
        "--config.eval.recall_every_steps=4",
        "--config.eval.recall_num_examples=8",
        "--config.eval.memory_every_steps=4",
        devices=2,  # the hooks read parameters laid out over a mesh
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recall (mean accuracy): mqar" in result.stdout
    return workdir


def test_hooks_log_recall_and_memory_scalars_and_figure(mqar_workdir):
    record = read_metrics(mqar_workdir)[4]
    # TINY: seq_len 32, 4 pairs -> MQAR with 2, 4 and 8 pairs; NIAH at depths 0, 0.5, 1.
    expected = [f"recall/mqar/T32_kv{n}" for n in (2, 4, 8)] + ["recall/mqar_mean"]
    expected += [f"recall/niah/T32_depth{d}" for d in ("0.00", "0.50", "1.00")]
    expected += ["recall/niah_mean"]
    expected += [f"memory/layer_00/{q}" for q in ("state_norm", "recall_error")]
    assert set(expected) <= set(record), sorted(record)
    assert all(0.0 <= record[key] <= 1.0 for key in expected if key.startswith("recall/"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(mqar_workdir))
    events.Reload()
    assert set(expected) <= set(events.Tags()["scalars"])
    assert "memory/behaviour" in events.Tags()["images"]


def test_recall_cli_writes_json_and_table(mqar_workdir):
    result = run(
        "-m", "evals.recall", f"--workdir={mqar_workdir}", "--seq_lens=32",
        "--num_kv_pairs=4,8,16", "--context_lengths=32", "--depths=0,1", "--num_examples=8",
        "--batch_size=8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mqar at step 4" in result.stdout and "exact_match" in result.stdout
    mqar = json.loads((mqar_workdir / "evals" / "recall_mqar_step4.json").read_text())
    assert mqar["step"] == 4 and mqar["task"] == "mqar"
    assert [(c["seq_len"], c["num_kv_pairs"]) for c in mqar["cells"]] == [(32, 4), (32, 8)]
    assert mqar["skipped"][0]["num_kv_pairs"] == 16  # 16 pairs and queries need 64 tokens
    niah = json.loads((mqar_workdir / "evals" / "recall_niah_step4.json").read_text())
    assert niah["format"] == "tokens" and [c["depth"] for c in niah["cells"]] == [0.0, 1.0]


@pytest.fixture(scope="module")
def text_workdir(tmp_path_factory):
    """2 steps of a 1-layer Transformer on byte-level text."""
    workdir = tmp_path_factory.mktemp("text")
    trained = run(
        "train.py", *TINY, f"--workdir={workdir}", "--config.data.name=text",
        "--config.data.max_bytes=200000", "--config.train.num_steps=2",
        "--config.model.num_layers=1",
        "--config.eval.every_steps=0",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    return workdir


def test_language_modeling_cli_on_a_text_run(text_workdir):
    workdir = text_workdir
    result = run(
        "-m", "evals.language_modeling", f"--workdir={workdir}", "--multiples=1,2",
        "--num_windows=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((workdir / "evals" / "language_modeling_step2.json").read_text())
    assert saved["unit"] == "bits_per_byte"
    assert [len(row["bucket_loss"]) for row in saved["lengths"]] == [1, 2]
    assert "bucket_loss" in result.stdout


def test_sampling_cli_streams_text_and_token_ids(text_workdir, mqar_workdir):
    sampled = run("-m", "models.generate", f"--workdir={text_workdir}", "--prompt=def ",
                  "--max_new_tokens=12", "--seed=1", "--top_k=20")  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout.startswith("def ") and len(sampled.stdout.encode()) >= 4 + 1
    again = run("-m", "models.generate", f"--workdir={text_workdir}", "--prompt=def ",
                "--max_new_tokens=12", "--seed=1", "--top_k=20")  # fmt: skip
    assert again.stdout == sampled.stdout  # the seed fixes the sample
    ids = run("-m", "models.generate", f"--workdir={mqar_workdir}", "--prompt_tokens=3,9,4",
              "--max_new_tokens=5", "--greedy")  # fmt: skip
    assert ids.returncode == 0, ids.stderr[-3000:]
    assert len(ids.stdout.split()) == 5 and all(int(t) < 64 for t in ids.stdout.split())
    no_ids = run("-m", "models.generate", f"--workdir={mqar_workdir}", "--prompt=abc")
    assert_one_line_error(no_ids, 2, "--prompt_tokens", "mqar")
    too_big = run("-m", "models.generate", f"--workdir={mqar_workdir}", "--prompt_tokens=64")
    assert_one_line_error(too_big, 2, "--prompt_tokens", "[0, 64)")


@pytest.fixture(scope="module")
def token_workdir(tmp_path_factory):
    """A BPE corpus from `python -m data.prepare`, and 2 steps of a Transformer trained on it
    through data.name=tokens (vocabulary, dtype and eos from its meta.json)."""
    root = tmp_path_factory.mktemp("tokens")
    corpus, workdir = root / "corpus", root / "run"
    write_text_files(root / "texts", DOCUMENTS)
    prepared = run("-m", "data.prepare", f"--input={root / 'texts'}", f"--output={corpus}",
                   "--vocab_size=300", "--eval_fraction=0.2")  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    trained = run(
        "train.py", *TINY, f"--workdir={workdir}", "--config.data.name=tokens",
        f"--config.data.path={corpus}", "--config.train.num_steps=2",
        "--config.model.num_layers=1", "--config.eval.every_steps=2",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    return corpus, workdir


def test_sampling_cli_encodes_and_decodes_with_the_runs_tokenizer(token_workdir):
    corpus, workdir = token_workdir
    meta = json.loads((corpus / "meta.json").read_text())
    assert json.loads((workdir / "config.json").read_text())["model"]["vocab_size"] == 300
    assert "eval_loss" in read_metrics(workdir)[2]
    args = ("-m", "models.generate", f"--workdir={workdir}", "--max_new_tokens=20", "--seed=3")
    sampled = run(*args, "--prompt=The memory")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout.startswith("The memory") and len(sampled.stdout) > len("The memory\n")
    tokenizer = prepare.load_tokenizer(str(corpus / "tokenizer.json"))
    from_ids = run(
        *args, "--prompt_tokens=" + ",".join(map(str, tokenizer.encode("The memory").ids))
    )
    assert from_ids.stdout == sampled.stdout  # the same prompt, given as its ids
    assert run(*args, f"--prompt_tokens={meta['vocab_size']}").returncode == 2
    missing = run(*args, "--prompt=x", f"--tokenizer={corpus / 'nope.json'}")
    assert_one_line_error(missing, 2, "nope.json: not a loadable tokenizer.json")


def test_a_relative_workdir_restores(token_workdir, monkeypatch):
    """`--workdir=runs/default` as the README writes it (Orbax wants absolute paths)."""
    from models.restore import restore

    _, workdir = token_workdir
    monkeypatch.chdir(workdir.parent)
    assert restore(workdir.name).step == 2


def test_bad_input_is_one_line_and_exit_2(tmp_path, mqar_workdir, capsys):
    missing = tmp_path / "nowhere"
    assert_one_line_error(run("-m", "evals.recall", f"--workdir={missing}"), 2, str(missing))
    unknown = run("-m", "evals.recall", f"--workdir={mqar_workdir}", "--task=copying")
    assert_one_line_error(unknown, 2, "--task", "copying")

    no_checkpoint = tmp_path / "fresh"
    no_checkpoint.mkdir()
    shutil.copy(mqar_workdir / "config.json", no_checkpoint / "config.json")
    assert common.run_cli(recall.main, [f"--workdir={no_checkpoint}"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {no_checkpoint}/checkpoints: no checkpoint to evaluate\n"
    )
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert common.run_cli(recall.main, [f"--workdir={not_a_run}"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert common.run_cli(recall.main, [f"--workdir={mqar_workdir}", "--step=3"]) == 2
    assert "no checkpoint of step 3" in capsys.readouterr().err
    assert common.run_cli(language_modeling.main, [f"--workdir={mqar_workdir}"]) == 2
    assert "text or tokens" in capsys.readouterr().err
