"""How many chunks each step of the chunked matrix-memory scan should compute at once.

    taskset -c 0 python -m benchmarks.linear_memory_chunking [--lengths 1024,...,16384]
        [--batches 1,2] [--chunks_per_step all,1,2,4] [--rounds 5]

`pallas_kernels.linear_memory.chunked.recurrence` (Gated DeltaNet, H 4, D 64, chunk 64,
float32) forward and forward + backward (the gradient of sum(o) in every input), jitted,
for each `chunks_per_step`: "all" computes every chunk's intra-chunk matrices at once
([B, H, N, C, C] arrays, the form before 2026-12-04 and accelerators' default), an integer
that many chunks per scan step, each step recomputed in the backward. The variants are
timed in interleaved rounds (round r times each once, in turn), median over rounds, and
their outputs are checked equal. Run it pinned to one core (`taskset -c 0`) for a
one-thread number; the header records the CPUs the process may use.

Writes benchmarks/results/linear_memory_chunking.{json,md}.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import layer_cost, peers
from evals import common
from pallas_kernels.linear_memory import chunked

HEADS, DIM, CHUNK = 4, 64, 64


def variant(text: str):
    return None if text == "all" else int(text)


def functions(chunks_per_step):
    def forward(q, k, v, g, beta):
        o, _ = chunked.recurrence(q, k, v, g, beta, scale=DIM**-0.5, chunk_size=CHUNK,
                                  chunks_per_step=chunks_per_step)  # fmt: skip
        return o

    backward = jax.grad(lambda *x: jnp.sum(forward(*x)), argnums=tuple(range(5)))
    return {"fwd": jax.jit(forward), "fwd+bwd": jax.jit(backward)}


def measure(batch, length, names, rounds):
    """{(variant, mode): median seconds} at one shape, and max |o - o_all| per variant."""
    inputs = [jnp.asarray(x) for x in peers.gdn_inputs(batch, length, HEADS, DIM)]
    compiled = {name: functions(variant(name)) for name in names}
    outputs = {name: fns["fwd"](*inputs) for name, fns in compiled.items()}
    for fns in compiled.values():
        jax.block_until_ready(fns["fwd+bwd"](*inputs))  # compile and warm up
    first = outputs[names[0]]
    errors = {name: float(jnp.max(jnp.abs(o - first))) for name, o in outputs.items()}
    times = {(name, mode): [] for name in names for mode in ("fwd", "fwd+bwd")}
    for _ in range(rounds):
        for (name, mode), samples in times.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled[name][mode](*inputs))
            samples.append(time.perf_counter() - start)
    return {key: float(np.median(samples)) for key, samples in times.items()}, errors


def markdown(payload) -> str:
    names = payload["settings"]["chunks_per_step"]
    lines = [
        "# Chunked matrix-memory scan: chunks per step",
        "",
        f"{payload['machine']}; CPUs usable: {payload['cpus']}; XLA_FLAGS "
        f"`{payload['xla_flags']}`; jax {payload['jax']}; {payload['date']}.",
        f"Command: `{payload['command']}`. Gated DeltaNet, H {HEADS}, D {DIM}, chunk {CHUNK}, "
        "float32; median of interleaved rounds; ratio = time / time with all chunks at once.",
        "",
        "| B | T | mode | " + " | ".join(f"{n} per step" for n in names) + " | ratios |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for row in payload["rows"]:
        for mode in ("fwd", "fwd+bwd"):
            seconds = [row["seconds"][f"{n} {mode}"] for n in names]
            ratios = " / ".join(f"{s / seconds[0]:.2f}" for s in seconds[1:])
            cells = " | ".join(f"{1e3 * s:.1f} ms" for s in seconds)
            lines.append(f"| {row['batch']} | {row['length']} | {mode} | {cells} | {ratios} |")
    worst = max(max(row["max_abs_difference"].values()) for row in payload["rows"])
    lines += ["", f"Largest |o - o(all at once)| over all rows: {worst:.1e}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=common.int_list, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batches", type=common.int_list, default=[1, 2])
    parser.add_argument("--chunks_per_step", default="all,1,2,4")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    names = args.chunks_per_step.split(",")
    for name in names:
        if name != "all" and not name.isdigit():
            parser.error(f"--chunks_per_step: {name!r} is neither 'all' nor a count")
    payload = layer_cost.run_header("benchmarks.linear_memory_chunking", argv)
    payload |= {"cpus": sorted(os.sched_getaffinity(0)), "settings": vars(args) | {
        "chunks_per_step": names}, "rows": []}  # fmt: skip
    for batch in args.batches:
        for length in args.lengths:
            seconds, errors = measure(batch, length, names, args.rounds)
            payload["rows"].append({
                "batch": batch, "length": length, "max_abs_difference": errors,
                "seconds": {f"{name} {mode}": s for (name, mode), s in seconds.items()},
            })  # fmt: skip
            timings = (f"{name} {mode} {1e3 * s:.1f} ms" for (name, mode), s in seconds.items())
            print(f"B{batch} T{length}: " + ", ".join(timings), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "linear_memory_chunking.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(args.out, "linear_memory_chunking.md"), "w") as f:
        f.write(markdown(payload))
    return payload


if __name__ == "__main__":
    main()
