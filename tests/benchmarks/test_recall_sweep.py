"""benchmarks.recall_sweep at a tiny step count: real train.py runs, results files, plot."""

import json

from benchmarks import plots, recall_sweep


def test_every_kind_has_a_recall_config_that_builds():
    for kind in ("attention", "gdn", "mom", "mag", "atlas", "memora"):
        config = recall_sweep.shipped(kind)
        assert config.model.block_pattern[0] == kind, recall_sweep.recall_config(kind)


def test_sweep_runs_train_and_keeps_earlier_rows(tmp_path):
    args = ["--kinds", "attention", "--num_steps", "4", "--evals_per_run", "2", "--out"]
    recall_sweep.main([*args, str(tmp_path), "--seeds", "0,1", "--learning_rates", "1e-3"])
    recall_sweep.main([*args, str(tmp_path), "--seeds", "1", "--learning_rates", "1e-3"])
    rows = json.loads((tmp_path / "mqar_recall.json").read_text())["rows"]
    assert sorted(row["seed"] for row in rows) == [0, 1]  # the rerun replaced seed 1's row
    for row in rows:
        assert row["returncode"] == 0, row["error"]
        assert sorted(row["curve"], key=int) == ["2", "4"]
        assert 0.0 <= row["recall"] <= 1.0 and row["batch_size"] == 64
        assert "--config=configs/mqar.py:attention" in row["command"]
    table = (tmp_path / "mqar_recall.md").read_text()
    assert table.count("| attention | 8 | 64 | 64 | 0.001 |") == 2
    assert plots.plot_all(tmp_path) == [tmp_path / "mqar_recall.png"]
