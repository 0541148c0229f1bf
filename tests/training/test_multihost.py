"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) train
like one process x 8 devices, each process reading only its own slice of the data."""

import shutil
import socket
import subprocess

from tests.training.test_train_cli import REPO, environment, read_metrics, train_command

STEPS = ["--config.train.num_steps=6", "--config.log.every_steps=1", "--config.eval.every_steps=0"]
# The two runs reduce the same gradients in a different order (gloo across processes vs
# in-process), so losses agree to float32 rounding, not bitwise.
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, *overrides):
    port = free_port()
    processes = [
        subprocess.Popen(
            train_command(
                workdir,
                *STEPS,
                *overrides,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={process_id}",
            ),
            cwd=REPO,
            env=environment(devices=4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process_id in range(2)
    ]
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def test_two_processes_match_one_process_and_resume(tmp_path):
    multi = tmp_path / "multi"
    outputs = run_two_processes(multi, "--config.checkpoint.every_steps=3")
    assert "mesh: {'data': 8, 'fsdp': 1, 'context': 1}" in outputs[0]
    assert "step 6/6" not in outputs[1], "only process 0 reports progress"

    single = tmp_path / "single"
    result = subprocess.run(
        train_command(single, *STEPS),
        cwd=REPO,
        env=environment(devices=8),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    multi_losses, single_losses = read_metrics(multi), read_metrics(single)
    assert sorted(multi_losses) == sorted(single_losses) == list(range(1, 7))
    for step, record in single_losses.items():
        assert abs(multi_losses[step]["loss"] - record["loss"]) <= RTOL * abs(record["loss"])
    assert (multi / "checkpoints" / "6").is_dir()

    # Resume in two processes from the step-3 checkpoint: the same losses again.
    shutil.rmtree(multi / "checkpoints" / "6")
    (multi / "metrics.jsonl").unlink()
    outputs = run_two_processes(multi, "--config.checkpoint.every_steps=3")
    assert f"resumed from {multi}/checkpoints/3" in outputs[0]
    resumed = read_metrics(multi)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == multi_losses[step]["loss"]

    # Each sequence split over 2 devices (ring attention), in two processes: the same losses;
    # then its step-3 checkpoint resumed without the split.
    split = tmp_path / "split"
    outputs = run_two_processes(split, "--config.checkpoint.every_steps=3",
                                "--config.mesh.context=2")  # fmt: skip
    assert "mesh: {'data': 4, 'fsdp': 1, 'context': 2}" in outputs[0]
    split_losses = read_metrics(split)
    for step, record in single_losses.items():
        assert abs(split_losses[step]["loss"] - record["loss"]) <= RTOL * abs(record["loss"])
    shutil.rmtree(split / "checkpoints" / "6")
    (split / "metrics.jsonl").unlink()
    outputs = run_two_processes(split, "--config.checkpoint.every_steps=3")
    assert f"resumed from {split}/checkpoints/3" in outputs[0]
    resumed = read_metrics(split)
    for step in (4, 5, 6):
        assert abs(resumed[step]["loss"] - split_losses[step]["loss"]) <= RTOL * abs(
            split_losses[step]["loss"]
        )
