"""Training-step time of Moneta and Memora in the papers' parallel forms vs their exact
chunk forms, beside the Titans LMM (issue 19, item 3).

    python -m benchmarks.miras_parallel_forms [--sizes tiny,small] [--rounds 7]

Variants: the LMM; Moneta with `lq_normaliser` "chunk_start" (Miras §5.4, linear chunk)
and "token" (eq. 24 at every token, materialised chunk); Memora with `kl_chunk_form`
"lag_token" (§5.4) and "exact" (eq. 27). Each is the real jitted train step of
`benchmarks.throughput` ("tiny": the MQAR size, 4,096 tokens a step; "small": the text
size, 2,048). All variants are compiled first and warmed up once; then `--rounds` rounds
time one step of every variant in turn (interleaved, so drift of the machine hits them
alike), and the median per variant is reported with its ratio to the LMM's tokens/s.
Writes `benchmarks/results/miras_parallel_forms_speed.md`.
"""

import argparse
import pathlib
import sys

from benchmarks import layer_cost
from benchmarks.step_timing import compiled_step, interleaved_medians
from benchmarks.throughput import checked_sizes

RESULTS = pathlib.Path(__file__).parent / "results"
VARIANTS = (  # (label, kind, option overrides of model.<kind>)
    ("lmm", "lmm", {}),
    ("moneta, lq_normaliser=chunk_start", "moneta", {"lq_normaliser": "chunk_start"}),
    ("moneta, lq_normaliser=token", "moneta", {"lq_normaliser": "token"}),
    ("memora, kl_chunk_form=lag_token", "memora", {"kl_chunk_form": "lag_token"}),
    ("memora, kl_chunk_form=exact", "memora", {"kl_chunk_form": "exact"}),
)


def measure(size, rounds):
    """{label: (median seconds per step, tokens per step)} over interleaved rounds."""
    runs = {label: compiled_step(k, size, o, rounds) for label, k, o in VARIANTS}
    return interleaved_medians(runs, rounds)


def markdown(header, results, rounds) -> str:
    lines = [
        "# Moneta and Memora: the papers' parallel forms against the exact chunk forms",
        "",
        f"{header['machine']}; jax {header['jax']}; {header['date']}",
        f"Command: `{header['command']}`; XLA_FLAGS `{header['xla_flags']}`",
        f"Train step (AdamW, jitted, donated), median of {rounds} interleaved rounds; "
        "ratio = tokens/s / the LMM's in the same run.",
        "",
        "| size | variant | ms/step | tokens/s | × LMM |",
        "|---|---|---:|---:|---:|",
    ]
    for size, rows in results.items():
        lmm_seconds = rows["lmm"][0]
        for label, (seconds, tokens) in rows.items():
            lines.append(
                f"| {size} | {label} | {1e3 * seconds:.1f} | {tokens / seconds:,.0f} | "
                f"{lmm_seconds / seconds:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = checked_sizes(parser, args.sizes)
    header = layer_cost.run_header("benchmarks.miras_parallel_forms", argv)
    results = {size: measure(size, args.rounds) for size in sizes}
    text = markdown(header, results, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "miras_parallel_forms_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
