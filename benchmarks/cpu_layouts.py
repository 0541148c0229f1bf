"""Training-step time with and without `layers.cpu_layouts.materialised_cotangent`, the
workaround for XLA:CPU's transposing fusion in a projection's backward (issue 19).

    python -m benchmarks.cpu_layouts [--models lmm,gdn,...] [--sizes tiny,small] [--rounds 7]

Every kind's real jitted train step (`benchmarks.throughput` sizes) is compiled twice, as
shipped and traced inside `cpu_layouts.disabled()` (the short convolutions' and output
gates' cotangents left to XLA's fusion), then timed in interleaved rounds
(`benchmarks.step_timing`). Writes `benchmarks/results/cpu_layouts.md`; run it pinned
(`taskset -c 0`) with single-threaded XLA, as `make bench` does.
"""

import argparse
import pathlib
import sys

from benchmarks import layer_cost
from benchmarks.step_timing import compiled_step, interleaved_medians
from benchmarks.throughput import checked_sizes
from layers import cpu_layouts

RESULTS = pathlib.Path(__file__).parent / "results"
MODELS = "attention,gdn,deltanet,gla,lmm,mal,mag,mac,mom"


def measure(kinds, size, rounds):
    """{(kind, "shipped" | "without"): (median s per step, tokens per step)}."""
    runs = {}
    for kind in kinds:
        runs[kind, "shipped"] = compiled_step(kind, size, {}, rounds)
        with cpu_layouts.disabled():
            runs[kind, "without"] = compiled_step(kind, size, {}, rounds)
    return interleaved_medians(runs, rounds)


def markdown(header, results, rounds) -> str:
    lines = [
        "# Projection backward on XLA:CPU: with and without `materialised_cotangent`",
        "",
        f"{header['machine']}; jax {header['jax']}; {header['date']}",
        f"Command: `{header['command']}`; XLA_FLAGS `{header['xla_flags']}`",
        f"Train step (AdamW, jitted, donated), median of {rounds} interleaved rounds; "
        "speed-up = time without / time shipped, in the same run. Attention is the "
        "control: the workaround touches none of its projections (its two compiled steps "
        "differ only in names), so its ratio is this protocol's own error.",
        "",
        "| size | kind | ms/step without | ms/step shipped | tokens/s shipped | speed-up |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size, rows in results.items():
        for kind in dict.fromkeys(kind for kind, _ in rows):
            (without, tokens), (shipped, _) = rows[kind, "without"], rows[kind, "shipped"]
            lines.append(
                f"| {size} | {kind} | {1e3 * without:.1f} | {1e3 * shipped:.1f} | "
                f"{tokens / shipped:,.0f} | {without / shipped:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = checked_sizes(parser, args.sizes)
    kinds = [kind for kind in args.models.split(",") if kind]
    header = layer_cost.run_header("benchmarks.cpu_layouts", argv)
    results = {size: measure(kinds, size, args.rounds) for size in sizes}
    text = markdown(header, results, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_layouts.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
