"""Smoke tests of benchmarks.throughput and benchmarks.model_comparison at tiny sizes:
the FLOP estimate and cache sizes against hand counts, parameter matching, and one short
end-to-end comparison row (no timing or accuracy is asserted); the Miras parallel-form
benchmark's variants and table."""

import json

import jax
import numpy as np
import pytest

from benchmarks import miras_parallel_forms, model_comparison, plots, throughput
from configs import base, mqar
from training import config_validation


def _resolved_mqar(kind):
    return model_comparison.resolved(model_comparison.mqar_config(kind, 1))


def test_estimated_flops_count_matmul_parameters_and_attention():
    config = _resolved_mqar("attention")  # d_model 64, 2 layers, 2 heads, T 64, tied
    count = model_comparison.parameter_count(config.model)
    abstract = {"w": jax.ShapeDtypeStruct((count,), np.float32)}
    estimate = throughput.estimated_flops_per_token(config, abstract)
    # 6 N (tied: the embedding is the output matmul) + 12 * layers * (heads*head_dim) * T.
    assert estimate["flops_per_token"] == 6 * count + 12 * 2 * 64 * 64
    config = _resolved_mqar("gdn")
    count = model_comparison.parameter_count(config.model)
    abstract = {"w": jax.ShapeDtypeStruct((count,), np.float32)}
    assert throughput.estimated_flops_per_token(config, abstract)["flops_per_token"] == 6 * count


def test_cache_bytes_split_fixed_and_per_token():
    # Attention: per layer, key + value [T, 64] float32 and int32 positions per token.
    cache = model_comparison.cache_bytes(_resolved_mqar("attention").model)
    assert cache == {"fixed": 0, "per_token": 2 * (2 * 64 * 4 + 4)}
    # Sliding window 256: a ring buffer of 256 slots, nothing per token past the window.
    cache = model_comparison.cache_bytes(_resolved_mqar("swa").model)
    assert cache == {"fixed": 256 * 2 * (2 * 64 * 4 + 4), "per_token": 0}
    cache = model_comparison.cache_bytes(_resolved_mqar("gdn").model)
    assert cache["per_token"] == 0 and cache["fixed"] > 0


def test_match_parameters_lands_within_one_mlp_step():
    target = model_comparison.parameter_count(_resolved_mqar("attention").model)
    config = model_comparison.match_parameters(model_comparison.mqar_config("gdn", 1), target)
    # One step of mlp_dim (8) changes 3 SwiGLU matrices of d_model 64 in each of 2 layers.
    step = 3 * 64 * 8 * 2
    assert abs(model_comparison.parameter_count(config.model) - target) <= step / 2


def test_throughput_row(tmp_path):
    rows = throughput.main(
        ["--models=attention", "--sizes=tiny", "--steps=1", "--peak_flops=1e9", f"--out={tmp_path}"]
    )
    (row,) = rows
    tiny = mqar.get_config("attention")
    tokens_per_step = tiny.train.batch_size * tiny.data.seq_len
    assert row["tokens_per_step"] == tokens_per_step and row["tokens_per_second"] > 0
    assert row["mfu_estimated"] > 0
    assert json.loads((tmp_path / "throughput_cpu.json").read_text())["peak_flops"] == 1e9


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_model_comparison_row_and_plot(tmp_path):
    # A row of another kind from an earlier run, and a stale attention row to be replaced.
    earlier = {"model": "gdn", "command": "an earlier command", "date": "2026-01-01 00:00 UTC"}
    stale = {"model": "attention", "command": "stale", "date": "2026-01-01 00:00 UTC"}
    (tmp_path / "model_comparison.json").write_text(json.dumps({"rows": [stale, earlier]}))
    rows = model_comparison.main(
        [
            "--models=attention",
            "--mqar_steps=2",
            "--text_steps=2",
            "--niah_lengths=16",
            "--niah_examples=2",
            f"--out={tmp_path}",
        ]
    )
    assert [r["model"] for r in rows] == ["gdn", "attention"]  # kept first, this run after
    row = rows[1]
    assert 0 <= row["mqar"]["eval_accuracy"] <= 1 and 0 <= row["niah"]["accuracy"] <= 1
    assert row["text"]["bits_per_token"] > 0 and row["text"]["tokens_per_second"] > 0
    assert (
        row["parameters_mqar"]
        == json.loads((tmp_path / "model_comparison.json").read_text())["target_parameters"]["mqar"]
    )
    table = (tmp_path / "model_comparison.md").read_text()
    assert table.index("| attention | 0 |") < table.index("| gdn | 0 |")  # display order
    assert "`an earlier command` (gdn)" in table and "stale" not in table
    assert plots.plot_all(tmp_path) == [tmp_path / "model_comparison.png"]


def test_a_diverging_run_is_a_result_not_the_end_of_the_sweep(tmp_path):
    config = model_comparison.mqar_config("attention", 2)
    config.model.init_std = float("nan")  # NaN weights: the loss is NaN at the first step
    run = model_comparison.train(config, str(tmp_path / "run"))
    assert "non-finite" in run["diverged"]
    row = {"model": "attention", "seed": 0, "command": "c", "date": "d", "mqar": run}
    model_comparison.write([row], {"machine": "test"}, str(tmp_path))
    assert (
        "| attention | 0 |  /  | diverged (step 1) |"
        in (tmp_path / "model_comparison.md").read_text()
    )


def test_tasks_text_runs_only_the_text_part(tmp_path):
    rows = model_comparison.main(
        ["--models=attention", "--tasks=text", "--text_steps=2", "--seed=1", f"--out={tmp_path}"]
    )
    (row,) = rows
    assert row["seed"] == 1 and row["text"]["bits_per_token"] > 0
    assert "mqar" not in row and "niah" not in row
    assert "| attention | 1 |" in (tmp_path / "model_comparison.md").read_text()
    with pytest.raises(SystemExit):
        model_comparison.main(["--tasks=mqar,txt", f"--out={tmp_path}"])


def _comparison_json(folder, rows):
    folder.mkdir()
    header = {"machine": "m", "date": "d", "command": "c"}
    (folder / "model_comparison.json").write_text(json.dumps({**header, "rows": rows}))


def test_merge_keeps_the_parts_a_text_rerun_lacks_and_says_who_made_them(tmp_path):
    full = {"model": "gdn", "seed": 0, "command": "full run", "date": "d0", "machine": "a",
            "mqar": {"eval_accuracy": 0.99}, "niah": {"accuracy": 0.6},
            "text": {"bits_per_token": 1.9}}  # fmt: skip
    other = {"model": "attention", "seed": 0, "command": "full run", "date": "d0",
             "text": {"bits_per_token": 1.8}}  # fmt: skip
    rerun = {"model": "gdn", "seed": 0, "command": "text rerun", "date": "d1", "machine": "b",
             "text": {"bits_per_token": 1.7}}  # fmt: skip
    _comparison_json(tmp_path / "out", [full, other])
    _comparison_json(tmp_path / "side", [rerun])
    rows = model_comparison.main([f"--merge={tmp_path / 'side'}", f"--out={tmp_path / 'out'}"])
    (gdn,) = [row for row in rows if row["model"] == "gdn"]
    assert gdn["text"]["bits_per_token"] == 1.7 and gdn["command"] == "text rerun"
    assert gdn["mqar"] == full["mqar"] and gdn["niah"] == full["niah"]
    assert gdn["carried"]["mqar"] == {"command": "full run", "date": "d0", "machine": "a"}
    assert "text" not in gdn["carried"] and len(rows) == 2
    table = (tmp_path / "out" / "model_comparison.md").read_text()
    assert "`text rerun` (gdn)" in table and "`full run` (attention, gdn mqar, gdn niah)" in table
    # A second rerun keeps the first provenance of what it carries.
    _comparison_json(tmp_path / "side2", [dict(rerun, command="again", date="d2")])
    rows = model_comparison.merge_folders([tmp_path / "side2"], tmp_path / "out")
    (gdn,) = [row for row in rows if row["model"] == "gdn"]
    assert gdn["carried"]["mqar"]["command"] == "full run" and gdn["command"] == "again"


def test_gradient_scale_reports_every_step_and_its_largest_leaves():
    from benchmarks import gradient_scale

    config = gradient_scale.comparison_text_config("attention", 0, ["train.batch_size=2"])
    assert config.train.batch_size == 2
    rows = gradient_scale.gradient_scale(config, steps=2, top=3)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        norms = [norm for _, norm in row["largest"]]
        assert len(norms) == 3 and norms == sorted(norms, reverse=True)
        # The leaves' norms are parts of the global norm the train step logs.
        assert 0 < norms[0] <= row["grad_norm"] * (1 + 1e-5)


def test_gradient_scale_breakdown_by_row_and_against_random_bytes():
    from benchmarks import gradient_scale

    config = gradient_scale.comparison_text_config("attention", 0, ["train.batch_size=2"])
    result = gradient_scale.first_batch_breakdown(config)
    assert len(result["per_row"]) == 2 and all(norm > 0 for norm in result["per_row"])
    # The batch's loss is the mean over both rows: its gradient is at most their mean's norm.
    assert 0 < result["batch"] <= sum(result["per_row"]) / 2 * (1 + 1e-5)
    assert result["random_bytes"] > 0 and len(result["largest_row"]) == config.data.seq_len


def test_miras_parallel_forms_variants_are_valid_configs_and_ratios_are_to_the_lmm():
    """Every variant's options are real MemorySpec options of its kind (a typo would be a
    config error, not a silently default run), and the table's ratio is the LMM's time over
    the variant's."""
    for _, kind, overrides in miras_parallel_forms.VARIANTS:
        config = throughput.SIZES["tiny"](kind, 3)
        for key, value in overrides.items():
            assert key in config.model[kind]
            config.model[kind][key] = value
        config_validation.validate(config, base.get_config())
    header = {"machine": "m", "jax": "j", "date": "d", "command": "c", "xla_flags": ""}
    results = {"tiny": {"lmm": (0.3, 4096), "moneta, x": (0.6, 4096)}}
    table = miras_parallel_forms.markdown(header, results, rounds=3)
    assert "| tiny | moneta, x | 600.0 | 6,827 | 0.50 |" in table
