"""Smoke tests of benchmarks.layer_cost and benchmarks.plots at tiny sizes (no timings
are asserted: only that every field is produced and the skip rules hold)."""

import json

import jax.numpy as jnp
import pytest

from benchmarks import layer_cost, plots


def test_growth_exponent_recovers_linear_and_quadratic_slopes():
    def rows(power):
        return [
            {"length": t, "forward": {"status": "ok", "median_s": 1e-6 * t**power}}
            for t in (256, 512, 1024, 2048)
        ]

    # Exact power laws: the least-squares slope is exact up to float rounding.
    assert layer_cost.growth_exponent(rows(1), "forward") == pytest.approx(1.0, abs=1e-9)
    assert layer_cost.growth_exponent(rows(2), "forward") == pytest.approx(2.0, abs=1e-9)
    assert layer_cost.growth_exponent(rows(1)[:1], "forward") is None


def test_predicted_seconds_extrapolates_with_the_measured_exponent():
    def row(length, seconds):
        return {
            "length": length,
            "forward": {"status": "ok", "median_s": seconds / 3},
            "forward_backward": {"status": "ok", "median_s": 2 * seconds / 3},
        }

    # One point: quadratic. 3 s per (forward, forward + backward) pair, x (2000/1000)^2, x
    # (4 repeats + 1 warm-up).
    assert layer_cost.predicted_seconds([row(1000, 3.0)], 2000, 4) == pytest.approx(3 * 4 * 5)
    # Two points growing linearly: the fitted exponent 1 is used.
    linear = [row(1000, 3.0), row(2000, 6.0)]
    assert layer_cost.predicted_seconds(linear, 4000, 4) == pytest.approx(6 * 2 * 5)
    # Faster than quadratic (cubic) is clamped to 2.
    cubic = [row(1000, 1.0), row(2000, 8.0)]
    assert layer_cost.predicted_seconds(cubic, 4000, 4) == pytest.approx(8 * 4 * 5)
    assert layer_cost.predicted_seconds([], 2000, 4) == 0.0


def test_compiled_stats_reports_memory_and_flops():
    import jax

    x = jnp.ones((64, 32), jnp.float32)
    compiled = jax.jit(lambda a: a @ a.T).lower(x).compile()
    stats = layer_cost.compiled_stats(compiled)
    # The [64, 64] float32 output alone is 16 KiB; a 64x32x64 matmul is ~2*64*32*64 flops.
    assert stats["compiled_peak_bytes"] >= 64 * 64 * 4
    assert stats["xla_flops"] >= 64 * 32 * 64


def test_sweep_writes_results_and_skips_over_budget(tmp_path):
    argv = [
        "--kinds=attention,gdn",
        "--lengths=32",
        "--repeats=1",
        "--reference_kinds=gdn",
        "--reference_lengths=32",
        f"--out={tmp_path}",
    ]
    rows, reference = layer_cost.main(argv)
    assert [(r["kind"], r["length"]) for r in rows] == [("attention", 32), ("gdn", 32)]
    for row in rows:
        for mode in layer_cost.MODES:
            result = row[mode]
            assert result["status"] == "ok" and result["median_s"] > 0
            assert result["compiled_peak_bytes"] > 0 and result["repeats"] == 1
    assert [(r["kind"], r["length"]) for r in reference] == [("gdn", 32)]
    assert reference[0]["reference"] > 0 and reference[0]["chunked"] > 0
    payload = json.loads((tmp_path / "layer_cost_cpu.json").read_text())
    assert payload["command"].startswith("python -m benchmarks.layer_cost --kinds=")
    assert "| gdn |" in (tmp_path / "layer_cost_cpu.md").read_text()
    written = plots.plot_all(tmp_path)
    assert written == [tmp_path / "layer_cost_cpu.png"] and written[0].stat().st_size > 10_000


def test_budget_and_memory_limits_skip_longer_lengths(tmp_path):
    args = layer_cost.parse_args(
        ["--kinds=attention", "--lengths=16,32,64", "--repeats=1", "--budget_s=1e-9"]
    )
    rows = layer_cost.sweep_kind("attention", args)
    assert rows[0]["forward"]["status"] == "ok"  # nothing to extrapolate from yet
    for row in rows[1:]:
        assert row["forward_backward"]["status"].startswith("skipped: over budget")
    args = layer_cost.parse_args(
        ["--kinds=attention", "--lengths=16,32", "--repeats=1", "--max_memory_gb=1e-9"]
    )
    rows = layer_cost.sweep_kind("attention", args)
    assert all(r["forward"]["status"].startswith("skipped: compiled peak") for r in rows)


def test_unknown_kind_is_a_usage_error():
    with pytest.raises(SystemExit):
        layer_cost.parse_args(["--kinds=no_such_kind"])
