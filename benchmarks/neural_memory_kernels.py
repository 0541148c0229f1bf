"""Wall time of the Titans deep-memory recurrence: chunked XLA vs the Pallas kernel.

    python -m benchmarks.neural_memory_kernels --batch=1 --heads=4 --dim=64 --chunk_size=16 \\
        --lengths=1024,2048,4096,8192,16384,32768,65536

Forward and forward+backward (gradient of a scalar of o and the final state w.r.t. every
input, initial weights and momentum included), each jitted, compiled once, then timed as the
median of `--repeats` runs with `block_until_ready`. The kernel columns run on a TPU / GPU
backend, whenever `kernel_api.kernel_rejects` accepts the shapes (not only what impl="auto"
would pick, so e.g. D = 64 on a GPU is measured too); on CPU they stay empty unless
`--interpret` runs the kernel in Pallas interpret mode (a correctness path, slow: keep T
small). Results go to `benchmarks/results/neural_memory_kernels_<backend>.json` and `.md`,
with device, date and command. Not run by the tests.

On a small shared CPU machine, run with
`XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"` (see
benchmarks/kernels.py).
"""

import argparse
import datetime
import json
import os
import pathlib
import platform as host
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import median_seconds
from pallas_kernels.neural_memory import MemoryInputs, chunked, kernel_api
from pallas_kernels.neural_memory.choices import MemorySpec, NeuralMemoryState

RESULTS = pathlib.Path(__file__).parent / "results"
MODES = ("forward", "forward_backward")


def make_inputs(spec, batch, length, heads, dim, dtype, seed=0):
    """Default-like Titans inputs (see tests/pallas_kernels/test_neural_memory.py)."""
    rng = np.random.default_rng(seed)
    tokens, per_token = (batch, length, heads, dim), (batch, length, heads)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def unit():
        x = normal(*tokens)
        return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), dtype)

    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    shapes = spec.weight_shapes(dim, dim)
    weights = {n: jnp.asarray(normal(batch, heads, *s) / np.sqrt(s[0])) for n, s in shapes.items()}
    momentum = {n: jnp.zeros((batch, heads, *s), jnp.float32) for n, s in shapes.items()}
    return (
        unit(),
        unit(),
        jnp.asarray(normal(*tokens), dtype),
        jnp.asarray(0.05 * sigmoid(normal(*per_token))),
        jnp.asarray(sigmoid(normal(*per_token))),
        jnp.asarray(-np.logaddexp(0.0, normal(*per_token) - 4.0)),
        NeuralMemoryState(weights, momentum),
    )


def make_functions(spec, impl, chunk_size, interpret):
    """(forward, forward+backward), both jitted, for impl "chunked" or a kernel platform."""

    def forward(*inputs):  # (q, k, v, lr, eta, g, state): gradients of each of the seven
        record, state = MemoryInputs(*inputs[:6]), inputs[6]
        if impl == "chunked":
            return chunked.chunked_scan(spec, record, state, chunk_size)
        return kernel_api.run_kernel(
            spec, record, state, chunk_size=chunk_size, platform=impl, interpret=interpret
        )

    def loss(*inputs):
        o, state = forward(*inputs)
        return jnp.sum(o.astype(jnp.float32) ** 2) + sum(
            jnp.sum(leaf**2) for leaf in jax.tree.leaves(state)
        )

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=tuple(range(7))))


def kernel_platform(spec, args):
    """The kernel this backend can run for these shapes, or None (with the reason)."""
    backend = jax.default_backend()
    platform = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(backend)
    if platform is None and args.interpret:
        platform = "tpu"
    if platform is None:
        return None, f"no Pallas kernel on backend {backend!r} (pass --interpret)"
    dtype = jnp.dtype(args.dtype)
    reason = kernel_api.kernel_rejects(
        spec, platform, args.dim, args.dim, args.chunk_size, (dtype, dtype, dtype)
    )
    return (None, reason) if reason else (platform, None)


def run(args, spec, platform):
    rows = []
    for length in args.lengths:
        inputs = make_inputs(spec, args.batch, length, args.heads, args.dim, jnp.dtype(args.dtype))
        row = {"length": length}
        for impl in ("chunked", "kernel"):
            for mode in MODES:
                row[f"{impl}_{mode}_ms"] = None
            if impl == "kernel" and platform is None:
                continue
            functions = make_functions(
                spec, "chunked" if impl == "chunked" else platform, args.chunk_size, args.interpret
            )
            for mode, fn in zip(MODES, functions):
                print(f"T={length} {impl} {mode}", file=sys.stderr, flush=True)
                call = lambda xs, fn=fn: fn(*xs)  # noqa: E731  (median_seconds passes one tuple)
                row[f"{impl}_{mode}_ms"] = 1e3 * median_seconds(call, inputs, args.repeats)
        for mode in MODES:
            base, kernel = row[f"chunked_{mode}_ms"], row[f"kernel_{mode}_ms"]
            row[f"kernel_speedup_{mode}"] = base / kernel if kernel else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(meta, rows):
    def cell(x, fmt="{:.2f}"):
        return "" if x is None else fmt.format(x)

    lines = [
        f"# Deep-memory (Titans) recurrence timings: {meta['device']}",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['command']}`",
        f"- XLA_FLAGS: `{meta['xla_flags']}`",
        f"- load average at start (1, 5, 15 min): {meta.get('load_average', '')}",
        f"- kernel: {meta['kernel']}",
        f"- MLP depth 2, expansion {meta['expansion']}, l2, gated decay, momentum; "
        f"B={meta['batch']}, H={meta['heads']}, D={meta['dim']}, {meta['dtype']}, "
        f"chunk {meta['chunk_size']}, median of {meta['repeats']} runs (ms)",
        "",
        "| T | chunked fwd | kernel fwd | chunked f+b | kernel f+b | kernel speedup fwd "
        "| kernel speedup f+b |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [str(row["length"])]
        for mode in MODES:
            cells += [cell(row[f"{impl}_{mode}_ms"]) for impl in ("chunked", "kernel")]
        cells += [cell(row[f"kernel_speedup_{mode}"], "{:.1f}x") for mode in MODES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk_size", type=int, default=16)
    parser.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interpret", action="store_true", help="kernel in interpret mode")
    args = parser.parse_args(argv)
    spec = MemorySpec(expansion=args.expansion)
    platform, reason = kernel_platform(spec, args)
    device = jax.devices()[0]
    meta = dict(
        device=f"{device.platform}:{device.device_kind}",
        machine=f"{host.node()} ({host.machine()}, {os.cpu_count()} CPUs), jax {jax.__version__}",
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command="python -m benchmarks.neural_memory_kernels " + " ".join(sys.argv[1:]),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()),  # shared machines: noise
        kernel=(f"{platform}" + (" (interpret mode)" if args.interpret else ""))
        if platform
        else f"not run: {reason}",
        **{k: v for k, v in vars(args).items() if k != "lengths"},
    )
    rows = run(args, spec, platform)
    RESULTS.mkdir(exist_ok=True)
    name = f"neural_memory_kernels_{jax.default_backend()}"
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(meta, rows))
    print(f"wrote {RESULTS / name}.json and .md")


if __name__ == "__main__":
    main()
