"""Wall time of the matrix-memory recurrence: reference scan, chunked XLA, Pallas kernel.

    python -m benchmarks.kernels --rule=gated_delta_rule --batch=1 --heads=4 --dim=64 \\
        --lengths=1024,2048,4096,8192 --max_reference_length=8192

Forward and forward+backward (gradient of a scalar of o and the final state w.r.t. every
input), each jitted, compiled once, then timed as the median of `--repeats` runs with
`block_until_ready`. The kernel columns run only on a TPU / GPU backend (`impl="pallas"`;
on CPU they stay empty); the reference is skipped above `--max_reference_length` (it is a
token-by-token scan). Results go to `benchmarks/results/kernels_<device>.json` and `.md`.
Not run by the tests.

On a small shared CPU machine, run with
`XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"`: with the
multi-threaded Eigen pool oversubscribed, the chunked backward ran ~40x slower and
sometimes hung (jax 0.10.2, 2 cores shared).
"""

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import linear_memory

RESULTS = pathlib.Path(__file__).parent / "results"
RULES = {
    "linear_attention": (False, False),
    "simple_gla": (True, False),
    "delta_rule": (False, True),
    "gated_delta_rule": (True, True),
}


def make_inputs(batch, length, heads, dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, length, heads)

    def unit():
        x = rng.standard_normal(shape + (dim,))
        return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), dtype)

    return dict(
        q=unit(),
        k=unit(),
        v=jnp.asarray(rng.standard_normal(shape + (dim,)), dtype),
        g=jnp.asarray(-np.logaddexp(0.0, rng.standard_normal(shape)), jnp.float32),
        beta=jnp.asarray(1.0 / (1.0 + np.exp(-rng.standard_normal(shape))), jnp.float32),
        initial_state=jnp.zeros((batch, heads, dim, dim), jnp.float32),
    )


def make_functions(rule, impl, chunk_size, interpret=False):
    """(forward, forward+backward), both jitted, taking the input dict; `interpret` runs a
    Pallas impl in interpret mode (CPU)."""
    takes_g, takes_beta = RULES[rule]
    fn = getattr(linear_memory, rule)

    def forward(x):
        gates = ([x["g"]] if takes_g else []) + ([x["beta"]] if takes_beta else [])
        return fn(
            x["q"],
            x["k"],
            x["v"],
            *gates,
            initial_state=x["initial_state"],
            output_final_state=True,
            chunk_size=chunk_size,
            impl=impl,
            interpret=interpret,
        )

    def loss(x):
        o, final_state = forward(x)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final_state**2)

    return jax.jit(forward), jax.jit(jax.grad(loss))


def median_seconds(fn, inputs, repeats):
    jax.block_until_ready(fn(inputs))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args):
    impls = ["reference", "chunked"]
    if jax.default_backend() in ("tpu", "gpu"):
        impls.append("pallas")
    rows = []
    for length in args.lengths:
        inputs = make_inputs(args.batch, length, args.heads, args.dim, jnp.dtype(args.dtype))
        row = {"length": length}
        for impl in ("reference", "chunked", "pallas"):
            for mode in ("forward", "forward_backward"):
                row[f"{impl}_{mode}_ms"] = None
            if impl not in impls or (impl == "reference" and length > args.max_reference_length):
                continue
            forward, forward_backward = make_functions(args.rule, impl, args.chunk_size)
            for mode, fn in (("forward", forward), ("forward_backward", forward_backward)):
                print(f"T={length} {impl} {mode}", file=sys.stderr, flush=True)
                row[f"{impl}_{mode}_ms"] = 1e3 * median_seconds(fn, inputs, args.repeats)
        for mode in ("forward", "forward_backward"):
            reference, chunked = row[f"reference_{mode}_ms"], row[f"chunked_{mode}_ms"]
            row[f"chunked_speedup_{mode}"] = reference / chunked if reference else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(meta, rows):
    def cell(x, fmt="{:.2f}"):
        return "" if x is None else fmt.format(x)

    lines = [
        f"# Linear-memory recurrence timings: {meta['device']}",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- XLA_FLAGS: `{meta['xla_flags']}`",
        f"- rule {meta['rule']}, B={meta['batch']}, H={meta['heads']}, Dk=Dv={meta['dim']}, "
        f"{meta['dtype']}, chunk {meta['chunk_size']}, median of {meta['repeats']} runs (ms)",
        "",
        "| T | reference fwd | chunked fwd | pallas fwd | reference f+b | chunked f+b "
        "| pallas f+b | chunked speedup fwd | chunked speedup f+b |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [str(row["length"])]
        for mode in ("forward", "forward_backward"):
            cells += [cell(row[f"{impl}_{mode}_ms"]) for impl in ("reference", "chunked", "pallas")]
        cells += [
            cell(row[f"chunked_speedup_{m}"], "{:.1f}x") for m in ("forward", "forward_backward")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", default="gated_delta_rule", choices=list(RULES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk_size", type=int, default=64)
    parser.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
    )
    parser.add_argument("--max_reference_length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    meta = dict(
        device=f"{device.platform}:{device.device_kind}",
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command="python -m benchmarks.kernels " + " ".join(sys.argv[1:]),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        **{k: v for k, v in vars(args).items() if k != "lengths"},
    )
    rows = run(args)
    RESULTS.mkdir(exist_ok=True)
    name = "kernels_" + "".join(c if c.isalnum() else "_" for c in device.device_kind)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(meta, rows))
    print(f"wrote {RESULTS / name}.json and .md")


if __name__ == "__main__":
    main()
