"""benchmarks/device_check.sh and .py without a GPU: the dry run stops with one clear line
and a non-zero exit; `--cpu-smoke` runs the correctness and timing code paths in Pallas
interpret mode and writes the results (one case here; every case in the slow test); a
failing case does not hide the others; cases past the time budget are skipped, saying so."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import device_check

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_dry_run_without_gpu_stops_with_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(tmp_path), PYTHON=sys.executable,
               DEVICE_CHECK_WHEELS=str(tmp_path / "no-wheels"))  # fmt: skip
    run = subprocess.run(["bash", "benchmarks/device_check.sh"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if "no GPU visible" in line]
    # One line; the CPU device count is whatever XLA_FLAGS the suite runs under.
    assert len(lines) == 1 and lines[0].startswith(
        "device_check: no GPU visible to jax (devices: [CpuDevice(id=0)"
    ), run.stdout + run.stderr
    assert not (tmp_path / "device_check.json").exists()
    assert (tmp_path / "device_check.log").exists()  # what comes back from the device


def _run(tmp_path, *args):
    out = tmp_path / "device_check.json"
    status = device_check.main(["--cpu-smoke", "--out", str(out), *args])
    return status, json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_cpu_smoke_one_case_writes_results(tmp_path):
    status, results, table = _run(tmp_path, "--cases", "linear_attention")
    assert status == 0
    [row] = results["correctness"]
    assert row["status"] == "pass", row
    arrays = {a["array"] for a in row["arrays"]}
    assert {"['o']", "['final_state']", "['d']['q']", "['d']['initial_state']"} <= arrays
    assert all(a["max_error"] <= a["bound"] for a in row["arrays"])
    [timing] = results["timing"]
    for impl in ("pallas_gpu", "chunked"):
        for mode in ("forward", "forward_backward"):
            assert timing["times_ms"][f"{impl} {mode}"] > 0
    assert timing["notes"] == {"jla": "cpu-smoke", "fla": "cpu-smoke"}
    assert "| linear_memory | linear_attention T37 segments f32 | pass |" in table
    assert "| linear_memory | linear_attention | 1 | 64 | 1 | 16 | float32 |" in table


def test_a_failing_case_does_not_hide_the_rest(tmp_path, monkeypatch):
    def flaky(**kwargs):
        if kwargs.get("rule") == "simple_gla":
            raise RuntimeError("Triton compilation failed:\nerror: boom")
        return [dict(array="['o']", max_error=0.0, bound=1e-5, ok=True)], 1e-5

    monkeypatch.setattr(device_check, "run_linear_case", flaky)
    status, results, table = _run(tmp_path, "--skip_timing", "--cases", "T37 segments f32")
    assert status == 1
    statuses = {row["case"].split()[0]: row["status"] for row in results["correctness"]}
    assert statuses == {"linear_attention": "pass", "simple_gla": "error", "delta_rule": "pass",
                        "gated_delta_rule": "pass"}  # fmt: skip
    [error] = [row for row in results["correctness"] if row["status"] == "error"]
    assert "Triton compilation failed" in error["error"] and "boom" in error["error"]
    assert "| error |" in table and "RuntimeError: Triton compilation failed:" in table


def test_cases_past_the_budget_are_skipped_saying_so(tmp_path):
    status, results, table = _run(tmp_path, "--budget_s", "0")
    assert status == 0
    assert results["correctness"] and results["timing"]
    assert all(row["status"] == "skipped" for row in results["correctness"])
    assert "| skipped |  |  |  | 0 | time budget spent |" in table
    assert all(row["skipped"] == "time budget spent" for row in results["timing"])
    assert "time budget spent" in table


@pytest.mark.slow
def test_cpu_smoke_every_kernel_case_passes(tmp_path):
    """Every kernel (the four matrix-memory rules, the Titans memory) in interpret mode."""
    status, results, _ = _run(tmp_path)
    assert status == 0
    names = [row["case"] for row in results["correctness"]]
    for kernel in (*device_check.LINEAR_RULES, "titans"):
        assert any(name.startswith(kernel) for name in names), kernel
    assert all(row["status"] == "pass" for row in results["correctness"]), names
    assert {row["family"] for row in results["timing"]} == {"linear_memory", "neural_memory"}
    for row in results["timing"]:
        assert len(row["times_ms"]) == 4, row
