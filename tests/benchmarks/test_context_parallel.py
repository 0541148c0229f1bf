"""benchmarks.context_parallel at a short length: real compiled programs and steps on the 8
test devices, results files written."""

import json

from benchmarks import context_parallel


def test_memory_per_device_falls_with_context(tmp_path):
    options = {"kinds": "gdn", "seq_lens": "2048", "contexts": "1,4", "time_seq_len": "2048",
               "time_kinds": "gdn", "steps": "1", "out": str(tmp_path)}  # fmt: skip
    rows = context_parallel.main([item for key, value in options.items()
                                  for item in (f"--{key}", value)])  # fmt: skip
    single, split = rows
    assert (single["context"], split["context"]) == (1, 4) and split["data"] == 2
    # Each device holds a quarter of the sequence; parameters and optimiser state are whole.
    assert split["compiled_peak_bytes"] < 0.5 * single["compiled_peak_bytes"]
    assert all(row["step_s"] > 0 for row in rows)
    stored = json.loads((tmp_path / "context_parallel_cpu.json").read_text())["rows"]
    assert [row["context"] for row in stored] == [1, 4]
    assert "| gdn | 2,048 | 1 | 4 |" in (tmp_path / "context_parallel_cpu.md").read_text()
