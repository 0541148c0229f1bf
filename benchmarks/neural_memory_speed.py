"""Forward + backward wall time of the Titans neural-memory layer: chunked recurrence
(Titans eqs. 16-18, `impl="chunked"`) vs the token-by-token reference (`impl="reference"`).

    python -m benchmarks.neural_memory_speed [--length 2048] [--repeats 5]

Both run the same `layers.neural_memory.NeuralMemory` (same parameters, MLP memory of depth
2, momentum, l2 bias) on the same input; the step is the gradient of sum(y^2) w.r.t. every
parameter and the input, jitted, compiled once (not timed), then timed `--repeats` times
with `block_until_ready`; the median is reported. Prints a table and writes
`benchmarks/results/neural_memory_speed.md`. Not run by the tests.
"""

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from layers.neural_memory import NeuralMemory
from pallas_kernels.neural_memory import MemorySpec

RESULTS = pathlib.Path(__file__).parent / "results"


def _layer(args, impl):
    return NeuralMemory(
        args.width,
        num_heads=args.heads,
        head_dim=args.head_dim,
        spec=MemorySpec(),
        chunk_size=args.chunk_size,
        impl=impl,
        rngs=nnx.Rngs(0),
    )


def time_forward_backward(layer, x, repeats):
    """Median seconds of one jitted forward + backward (compile excluded)."""

    def loss(module, inputs):
        y, _ = module(inputs)
        return jnp.sum(jnp.square(y))

    step = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(layer, x))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(layer, x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=32)
    parser.add_argument("--chunk_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)

    x = jax.random.normal(jax.random.key(0), (args.batch, args.length, args.width), jnp.float32)
    seconds = {
        impl: time_forward_backward(_layer(args, impl), x, args.repeats)
        for impl in ("chunked", "reference")
    }
    shape = (
        f"B={args.batch}, T={args.length}, D={args.width}, H={args.heads}, "
        f"head_dim={args.head_dim}, chunk_size={args.chunk_size}, MLP depth 2, momentum"
    )
    lines = [
        "# Neural memory layer: forward + backward wall time",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, backend "
        f"{jax.default_backend()} ({platform.processor() or platform.machine()}, "
        f"{len(jax.devices())} device(s), {os.cpu_count()} CPUs, 1-min load average "
        f"{os.getloadavg()[0]:.1f} at the end), median of {args.repeats}, compile excluded.",
        f"Command: `{' '.join(['python -m benchmarks.neural_memory_speed', *sys.argv[1:]])}`",
        f"Shapes: {shape}.",
        "",
        "| impl | seconds | tokens/s | vs reference |",
        "|---|---:|---:|---:|",
    ]
    tokens = args.batch * args.length
    for impl, value in seconds.items():
        speedup = seconds["reference"] / value
        lines.append(f"| {impl} | {value:.4f} | {tokens / value:,.0f} | {speedup:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "neural_memory_speed.md").write_text(text)


if __name__ == "__main__":
    main()
