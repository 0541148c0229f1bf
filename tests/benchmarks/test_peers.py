"""Smoke tests of benchmarks.peers without the peers installed: our side's worker at a tiny
shape prints the JSON the orchestrator reads, and a missing peer interpreter gives a
"not importable" row instead of a crash (no timing is asserted)."""

import json
import subprocess
import sys

import numpy as np

from benchmarks import peers


def test_worker_for_our_side_prints_ready_then_times():
    argv = ["--worker", "--comparison=gdn", "--shape=1x64x2x16", "--chunk=16", "--side=ours"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", *argv],
        input="time 2\n",
        capture_output=True,
        text=True,
        cwd=peers.REPO,
        timeout=120,
        check=True,
    )
    ready, timed = (json.loads(line) for line in done.stdout.splitlines())
    assert ready["status"] == "ready" and ready["compile_s"] > 0
    assert ready["versions"]["backend"] == "cpu" and "jax" in ready["versions"]
    assert len(timed["times"]) == 2 and all(t > 0 for t in timed["times"])


def test_gdn_inputs_are_normalised_gates_in_range():
    q, k, v, g, beta = peers.gdn_inputs(1, 32, 2, 8)
    assert q.shape == k.shape == v.shape == (1, 32, 2, 8) and g.shape == beta.shape == (1, 32, 2)
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), 1.0, rtol=1e-5)
    assert (g <= 0).all() and ((beta > 0) & (beta < 1)).all()
    np.testing.assert_array_equal(q, peers.gdn_inputs(1, 32, 2, 8)[0])  # same seed, same q


def test_missing_peer_interpreter_gives_a_not_importable_row(tmp_path):
    missing = str(tmp_path / "no-such-python")
    worker = peers.Worker(missing, ["--comparison=titans", "--shape=1x64"], "all")
    assert worker.error.startswith(peers.NOT_IMPORTABLE) and worker.proc is None
    worker.time(1)  # a no-op, not a crash
    assert worker.summary() == {"status": worker.error}

    argv = [
        f"--jla_python={missing}",
        f"--titans_python={missing}",
        "--comparisons=gdn",
        "--gdn_shapes=1x64x2x16",
        "--rounds=1",
        "--threads=all",
        "--no_check",
        f"--out={tmp_path}",
    ]
    report = peers.main(argv)
    (row,) = report["modes"]["all"]["results"]
    assert row["sides"]["jax-linear-attention"]["status"].startswith(peers.NOT_IMPORTABLE)
    ours = row["sides"]["ours"]
    assert ours["status"] == "ok" and len(ours["times"]) == 1
    text = (tmp_path / "peers_cpu.md").read_text()
    assert "| gdn: ours vs jax-linear-attention | B1 T64 H2 D16 |" in text
    assert "not importable (no interpreter at" in text
    assert json.loads((tmp_path / "peers_cpu.json").read_text())["modes"]["all"]["rounds"] == 1
