"""`train.py` end to end, in subprocesses: it learns, logs, resumes, and fails clearly."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# A tiny MQAR run, small enough to compile fast. These tests check what a run writes and how
# it resumes and fails; that models learn to recall is tests/training/test_recall_learning.py.
TINY = [
    "--config=configs/mqar.py",
    "--config.model.d_model=32",
    "--config.data.seq_len=32",
    "--config.data.mqar.num_kv_pairs=4",
    "--config.data.mqar.vocab_size=64",
    "--config.train.batch_size=16",
    "--config.optim.learning_rate=0.01",
    "--config.optim.warmup_steps=2",
]


def environment(devices: int = 1):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def train_command(workdir, *overrides):
    return [sys.executable, "train.py", *TINY, f"--workdir={workdir}", *overrides]


def run_train(workdir, *overrides, devices=1, timeout=300):
    return subprocess.run(
        train_command(workdir, *overrides),
        cwd=REPO,
        env=environment(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(workdir):
    """step -> the record last written for it (a resumed run rewrites replayed steps)."""
    records = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            records.setdefault(record["step"], {}).update(record)
    return records


def test_tiny_mqar_run_logs(tmp_path):
    workdir = tmp_path / "run"
    result = run_train(
        workdir,
        "--config.train.num_steps=30",
        "--config.log.every_steps=5",
        "--config.eval.every_steps=30",
        "--config.eval.num_batches=2",
        "--config.log.profile_start_step=2",
        "--config.log.profile_num_steps=2",
        devices=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 30/30" in result.stdout and "ETA" in result.stdout and "tok/s" in result.stdout
    metrics = read_metrics(workdir)
    assert sorted(metrics) == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "learning_rate", "grad_norm", "param_norm", "tokens_per_second"):
        assert key in metrics[5]
    assert {"eval_loss", "eval_accuracy"} <= set(metrics[30])
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["num_steps"] == 30 and saved["model"]["vocab_size"] > 0
    assert (workdir / "checkpoints" / "30").is_dir()
    assert list((workdir / "profile").rglob("*.xplane.pb")), "profiler trace written"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir))
    events.Reload()
    assert {"loss", "learning_rate", "eval_loss"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("loss")] == [5, 10, 15, 20, 25, 30]


def interrupt_after(workdir, step, sig, *overrides):
    """Start a run, send `sig` once it reports `step`, and wait for it to end."""
    process = subprocess.Popen(
        train_command(workdir, *overrides),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
            process.send_signal(sig)
            break
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, line + stdout, stderr


RESUME = [
    "--config.train.num_steps=32",
    "--config.log.every_steps=1",
    "--config.eval.every_steps=0",
    "--config.checkpoint.every_steps=4",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_train(workdir, *RESUME)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def final_state(workdir, step=32):
    """The saved train state as numpy arrays (no target: exactly what is on disk)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def assert_same_run(workdir, reference):
    resumed, expected = read_metrics(workdir), read_metrics(reference)
    assert sorted(resumed) == sorted(expected)
    for step, record in expected.items():
        # Same program, same inputs, same device: CPU results are bit-identical.
        assert resumed[step]["loss"] == record["loss"], step
    import jax
    import numpy as np

    jax.tree.map(np.testing.assert_array_equal, final_state(workdir), final_state(reference))


def test_killed_run_resumes_bit_identically(tmp_path, uninterrupted):
    workdir = tmp_path / "killed"
    # Synchronous saves, so that once a step is reported the checkpoint before it is
    # complete (a kill in the middle of an async save is survived as well, see below).
    sync = "--config.checkpoint.async_save=False"
    for kill_at in (6, 19):  # two kills, the second in a resumed run
        code, _, _ = interrupt_after(workdir, kill_at, signal.SIGKILL, *RESUME, sync)
        assert code == -signal.SIGKILL
    result = run_train(workdir, *RESUME, sync)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert_same_run(workdir, uninterrupted)


def test_corrupt_latest_checkpoint_is_skipped(tmp_path, uninterrupted):
    workdir = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, workdir)
    for path in (workdir / "checkpoints" / "32" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    os.remove(workdir / "metrics.jsonl")
    result = run_train(workdir, *RESUME, "--config.train.num_steps=32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping unreadable checkpoint {workdir}/checkpoints/32" in result.stderr
    assert (workdir / "checkpoints" / "corrupt-32").is_dir()
    assert f"resumed from {workdir}/checkpoints/28" in result.stdout
    assert sorted(read_metrics(workdir)) == [29, 30, 31, 32]
    import jax
    import numpy as np

    jax.tree.map(np.testing.assert_array_equal, final_state(workdir), final_state(uninterrupted))


def test_sigterm_saves_and_exits_cleanly(tmp_path, uninterrupted):
    workdir = tmp_path / "preempted"
    code, stdout, _ = interrupt_after(workdir, 3, signal.SIGTERM, *RESUME)
    assert code == 0
    assert "preempted: saved step" in stdout
    saved_step = int(stdout.split("preempted: saved step")[1].split()[0])
    assert (workdir / "checkpoints" / str(saved_step)).is_dir()
    result = run_train(workdir, *RESUME)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(workdir, uninterrupted)


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for fragment in fragments:
        assert fragment in last, last


def test_unknown_config_key_exits_2(tmp_path):
    result = run_train(tmp_path / "w", "--config.train.num_stepz=3")
    assert_one_line_error(result, 2, "num_stepz")
    assert not (tmp_path / "w").exists()


def test_bad_value_exits_2_naming_the_key(tmp_path):
    result = run_train(tmp_path / "w", "--config.train.grad_accum_steps=3")
    assert_one_line_error(result, 2, "train.batch_size")
    assert not (tmp_path / "w").exists()


def test_missing_data_path_exits_2_naming_the_file(tmp_path):
    missing = tmp_path / "no_such_corpus"
    result = run_train(tmp_path / "w", "--config.data.name=text", f"--config.data.path={missing}")
    assert_one_line_error(result, 2, str(missing))
    assert not (tmp_path / "w").exists()


def test_nonfinite_loss_exits_1_naming_the_step(tmp_path):
    result = run_train(
        tmp_path / "w",
        "--config.train.num_steps=10",
        "--config.train.inject_nonfinite_at_step=4",
        "--config.checkpoint.every_steps=2",
    )
    assert_one_line_error(
        result, 1, "non-finite loss (nan) at step 5", "last good checkpoint", "checkpoints/4"
    )


def test_nonfinite_skip_policy_continues(tmp_path):
    workdir = tmp_path / "w"
    result = run_train(
        workdir,
        "--config.train.num_steps=6",
        "--config.train.inject_nonfinite_at_step=2",
        "--config.train.nonfinite=skip",
        "--config.log.every_steps=1",
        "--config.eval.every_steps=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: non-finite update skipped" in result.stdout
    assert read_metrics(workdir)[6]["nonfinite_steps"] == 1


def test_unusable_checkpoint_directory_exits_2_and_writes_nothing(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a directory")
    result = run_train(workdir, "--config.train.num_steps=2")
    assert_one_line_error(result, 2, f"{workdir}/checkpoints", "not a directory")
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints"]


def test_workdir_of_a_different_run_is_refused(tmp_path):
    workdir = tmp_path / "w"
    short = ["--config.train.num_steps=2", "--config.eval.every_steps=0"]
    assert run_train(workdir, *short).returncode == 0
    result = run_train(workdir, *short, "--config.model.d_model=16")
    assert_one_line_error(result, 2, "different config", "model.d_model")
    changed = ["--config.train.num_steps=3", "--config.optim.learning_rate=0.001"]
    result = run_train(workdir, *short[1:], *changed)
    assert_one_line_error(result, 2, "different config", "optim.learning_rate")
    result = run_train(
        workdir, *short[1:], *changed, "--config.checkpoint.allow_config_change=True"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout


def write_tokens(path, values, dtype="uint16"):
    import numpy as np

    np.asarray(values, dtype=dtype).tofile(path)
    return path


@pytest.mark.parametrize(
    "case, overrides, fragments",
    [
        ("model name", ["--config.model.name=gpt9"], ["model.name", "gpt9"]),
        ("block kind", ["--config.model.block_pattern=('attention','lstm')"], ["lstm"]),
        ("mesh too big", ["--config.mesh.data=4", "--config.mesh.fsdp=4"], ["needs 16 devices"]),
        ("batch vs devices", ["--config.train.batch_size=6"], ["train.batch_size", "4 devices"]),
        ("loss chunk", ["--config.model.loss_chunk_size=5"], ["model.loss_chunk_size"]),
        (
            "recall task",
            ["--config.eval.recall_tasks=('mqar','copying')"],
            ["eval.recall_tasks", "copying"],
        ),
        ("niah depth", ["--config.eval.niah_depths=(0.5,1.5)"], ["eval.niah_depths", "1.5"]),
        ("empty data dir", ["--config.data.name=text", "--config.data.path={empty}"], ["{empty}"]),
        (
            "token >= vocab",
            [
                "--config.data.name=tokens",
                "--config.data.vocab_size=100",
                "--config.data.path={tokens}",
            ],
            ["{tokens}", "100"],
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, case, overrides, fragments):
    (tmp_path / "empty").mkdir()
    paths = {
        "empty": str(tmp_path / "empty"),
        "tokens": str(write_tokens(tmp_path / "t.bin", list(range(90)) * 50 + [100])),
    }
    overrides = [o.format(**paths) for o in overrides]
    fragments = [f.format(**paths) for f in fragments]
    result = subprocess.run(
        train_command(tmp_path / "w", *overrides),
        cwd=REPO,
        env=environment(devices=4),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, 2, *fragments)
    assert not (tmp_path / "w").exists(), case


@pytest.mark.parametrize("name", ["adamw", "muon", "normuon", "apollo", "apollo_mini", "slimadam"])
def test_each_optimizer_trains_from_train_py(tmp_path, name):
    workdir = tmp_path / name
    result = run_train(
        workdir,
        "--config.data.name=text",
        f"--config.optim.name={name}",
        "--config.optim.adamw_learning_rate=0.01",
        "--config.train.num_steps=20",
        "--config.log.every_steps=5",
        "--config.eval.every_steps=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = read_metrics(workdir)
    # Bytes start near ln(256) = 5.5 nats; 20 steps of any working optimizer learn the
    # unigram statistics of source code, well over a nat lower.
    assert losses[20]["loss"] < losses[5]["loss"] - 0.5, (name, losses)
