"""benchmarks.recall_sweep at a tiny step count: real train.py runs, results files, plot."""

import json

from benchmarks import plots, recall_sweep


def test_every_kind_has_a_recall_config_that_builds():
    for kind in ("attention", "gdn", "mom", "mag", "atlas", "memora"):
        config = recall_sweep.shipped(kind)
        assert config.model.block_pattern[0] == kind, recall_sweep.recall_config(kind)


def test_sweep_runs_train_and_keeps_earlier_rows(tmp_path):
    args = ["--kinds", "attention", "--num_steps", "4", "--evals_per_run", "2", "--out"]
    kept = tmp_path / "runs"
    recall_sweep.main([*args, str(tmp_path), "--seeds", "0,1", "--learning_rates", "1e-3",
                       "--keep_workdirs", str(kept)])  # fmt: skip
    recall_sweep.main([*args, str(tmp_path), "--seeds", "1", "--learning_rates", "1e-3"])
    rows = json.loads((tmp_path / "mqar_recall.json").read_text())["rows"]
    assert sorted(row["seed"] for row in rows) == [0, 1]  # the rerun replaced seed 1's row
    # Seed 0's workdir was kept with its final checkpoint; seed 1's rerun was not kept.
    (seed_0,) = [row for row in rows if row["seed"] == 0]
    assert seed_0["workdir"] == str(kept / "attention_p8_t64_b64_lr0.001_s0_n4")
    assert (kept / "attention_p8_t64_b64_lr0.001_s0_n4" / "checkpoints" / "4").is_dir()
    assert [row["workdir"] for row in rows if row["seed"] == 1] == [""]
    for row in rows:
        assert row["returncode"] == 0, row["error"]
        assert sorted(row["curve"], key=int) == ["2", "4"]
        assert 0.0 <= row["recall"] <= 1.0 and row["batch_size"] == 64
        assert "--config=configs/mqar.py:attention" in row["command"]
    table = (tmp_path / "mqar_recall.md").read_text()
    assert table.count("| attention | 8 | 64 | 64 | 0.001 |") == 2
    assert plots.plot_all(tmp_path) == [tmp_path / "mqar_recall.png"]
