"""Time and memory of one block of every registered kind, as the sequence grows.

    python -m benchmarks.layer_cost [--kinds attention,gdn,...] [--lengths 1024,...,32768]
        [--d_model 64] [--num_heads 2] [--repeats 5] [--budget_s 60] [--max_memory_gb 4]

For each kind in `models.registered_blocks()` (so new kinds appear by themselves) one block
of width `--d_model` (batch 1, the kind's registered defaults) is jitted on x [1, T, D]:
"forward" (y = block(x)) and "forward_backward" (the gradient of mean(y^2) w.r.t. every
parameter and x). Per (kind, T, mode) it records

- compiled memory: `jax.jit(f).lower(...).compile().memory_analysis()` (XLA's buffer
  assignment: arguments + outputs + temporaries - aliased), and XLA's flop count (`cost_analysis()`;
  best effort: a scan's body is counted once, not once per step);
- measured peak: on CPU the growth of the process's peak resident memory (VmHWM, reset
  through /proc/self/clear_refs after `malloc_trim`) during one call; on an accelerator the
  device's `peak_bytes_in_use` (a process-lifetime peak);
- wall time: the median of `--repeats` calls after one untimed warm-up.

Lengths go up in order; a (kind, T) whose cost, extrapolated from the lengths measured
(`predicted_seconds`), would pass `--budget_s`, or whose compiled peak passes
`--max_memory_gb`, is skipped and recorded as such, and so are the longer ones of that kind.
`--reference_kinds` at `--reference_lengths` also times the token-by-token reference
recurrence (`impl="reference"`) against the chunked one (`impl="chunked"`), forward +
backward.

Results: `benchmarks/results/layer_cost_<backend>.json` and `.md`. On a small shared CPU run
with `XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"`
(see `benchmarks/kernels.py`). Not run by the tests beyond a tiny smoke run.
"""

import argparse
import ctypes
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models

RESULTS = pathlib.Path(__file__).parent / "results"
MODES = ("forward", "forward_backward")


def machine_description() -> str:
    """CPU model and core count, plus the accelerator if JAX runs on one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    where = f"{cpu}, {os.cpu_count()} cores"
    if device.platform != "cpu":
        where = f"{device.device_kind} ({device.platform}); host {where}"
    return where


def run_header(module: str, argv) -> dict:
    """Machine, date, exact command and environment of a benchmark run (goes in every file)."""
    return {
        "machine": machine_description(),
        "backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m", module, *argv]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax": jax.__version__,
    }


def build_block(kind: str, d_model: int, num_heads: int, overrides=None) -> nnx.Module:
    """One block of `kind` at width d_model (registered defaults, plus `overrides`)."""
    config = models.default_config()
    config.d_model, config.num_heads, config.num_layers = d_model, num_heads, 1
    for key, value in (overrides or {}).items():
        config[kind][key] = value
    return models.build_block(kind, config, layer_index=0, rngs=nnx.Rngs(0))


def block_functions(block: nnx.Module):
    """(params, {mode: f(params, x)}) for the block's forward and forward + backward."""
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)

    def forward(params, x):
        module = nnx.merge(graphdef, params, rest)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        y, _ = module(x, positions=positions)
        return y

    def loss(params, x):
        return jnp.mean(jnp.square(forward(params, x)))

    return params, {"forward": forward, "forward_backward": jax.grad(loss, argnums=(0, 1))}


def compiled_stats(compiled) -> dict:
    """Bytes of XLA's buffer assignment (arguments + outputs + temporaries - aliased) and
    its flop count.

    `peak_memory_in_bytes` is recorded too but not used as the peak: on the CPU backend
    (jax 0.10.2) it stayed at ~1 MiB for attention at T=4096, whose [T, T] scores alone take
    the 256 MiB that `temp_size_in_bytes` reports (and the resident set grows by).
    """
    memory = compiled.memory_analysis()
    stats = {"compiled_peak_bytes": None, "compiled_temp_bytes": None, "xla_flops": None}
    if memory is not None:
        stats["compiled_peak_bytes"] = int(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
        stats["compiled_temp_bytes"] = int(memory.temp_size_in_bytes)
        stats["xla_peak_memory_in_bytes"] = getattr(memory, "peak_memory_in_bytes", None)
    costs = compiled.cost_analysis()
    if isinstance(costs, list | tuple):  # older jax: one dict per computation
        costs = costs[0] if costs else None
    if costs and "flops" in costs:
        stats["xla_flops"] = float(costs["flops"])
    return stats


def _resident_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def measured_peak_bytes(call) -> int | None:
    """Peak memory growth during `call()`: CPU resident set (Linux), else device stats."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        call()
        return (device.memory_stats() or {}).get("peak_bytes_in_use", stats.get("peak_bytes"))
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS is current
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        call()
        return None
    before = _resident_bytes("VmRSS")
    call()
    peak = _resident_bytes("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0)


def measure(fn, args, *, repeats: int, budget_s: float, max_bytes: float) -> dict:
    """Compile, check memory, then time `fn(*args)`: median of up to `repeats` calls."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    result = {"compile_s": time.perf_counter() - start, **compiled_stats(compiled)}
    peak = result["compiled_peak_bytes"]
    if peak is not None and peak > max_bytes:
        return {**result, "status": f"skipped: compiled peak {peak / 2**30:.1f} GiB over limit"}

    def call():
        jax.block_until_ready(compiled(*args))

    result["measured_peak_bytes"] = measured_peak_bytes(call)  # also the warm-up call
    times, deadline = [], time.perf_counter() + budget_s
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return {**result, "status": "ok", "median_s": statistics.median(times), "repeats": len(times)}


def predicted_seconds(measured: list[dict], length: int, repeats: int) -> float:
    """Cost of the next length from the last one measured, growing as T^p: p is the slope
    fitted to the lengths measured so far (clamped to [1, 2]), or 2 from a single point."""
    if not measured:
        return 0.0
    previous = measured[-1]
    exponent = growth_exponent(measured, "forward_backward") if len(measured) > 1 else 2.0
    exponent = min(max(exponent, 1.0), 2.0)
    per_call = sum(previous[mode]["median_s"] for mode in MODES)
    return per_call * (length / previous["length"]) ** exponent * (repeats + 1)


def sweep_kind(kind, args, overrides=None) -> list[dict]:
    """Every length of one kind, both modes; stops at the first length over budget."""
    rows, measured, stop_reason = [], [], None
    for length in args.lengths:
        row = {"kind": kind, "length": length, **({"impl": overrides["impl"]} if overrides else {})}
        predicted = predicted_seconds(measured, length, args.repeats)
        if stop_reason is None and predicted > args.budget_s:
            stop_reason = f"skipped: over budget (predicted {predicted:.0f} s > {args.budget_s} s)"
        if stop_reason is not None:
            rows.append({**row, **{mode: {"status": stop_reason} for mode in MODES}})
            continue
        block = build_block(kind, args.d_model, args.num_heads, overrides)
        params, functions = block_functions(block)
        x = jax.random.normal(jax.random.key(0), (1, length, args.d_model), jnp.float32)
        for mode in MODES:
            print(f"{kind} T={length} {mode} {overrides or ''}", file=sys.stderr, flush=True)
            row[mode] = measure(
                functions[mode],
                (params, x),
                repeats=args.repeats,
                budget_s=args.budget_s / 2,
                max_bytes=args.max_memory_gb * 2**30,
            )
            if row[mode]["status"] != "ok":
                stop_reason = row[mode]["status"]
        rows.append(row)
        if stop_reason is None:
            measured.append(row)
    return rows


def growth_exponent(rows, mode) -> float | None:
    """Least-squares slope of log(time) against log(T): ~1 linear, ~2 quadratic."""
    points = [(r["length"], r[mode]["median_s"]) for r in rows if r[mode].get("status") == "ok"]
    if len(points) < 2:
        return None
    lengths, seconds = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(lengths, seconds, 1)[0])


def _cell(result: dict, key: str, scale: float, fmt: str) -> str:
    if result.get("status") != "ok" and key == "median_s":
        return "skip" if result.get("status") else ""
    value = result.get(key)
    return "" if value is None else fmt.format(value * scale)


def markdown(header, settings, rows, reference_rows) -> str:
    lengths = sorted({r["length"] for r in rows})
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    lines = [
        "# Layer cost: one block per kind, by sequence length",
        "",
        f"{header['machine']}; backend {header['backend']}; jax {header['jax']}; {header['date']}",
        f"Command: `{header['command']}`; XLA_FLAGS `{header['xla_flags']}`",
        f"Settings: {settings}. Times: median ms. Memory: MiB. 'skip' = over the time or "
        "memory budget (see the JSON for the reason); exponent = slope of log time vs log T.",
    ]
    columns = " | ".join(f"T={t}" for t in lengths)
    for mode in MODES:
        for title, key, scale, fmt in (
            ("time (ms)", "median_s", 1e3, "{:.1f}"),
            ("compiled peak memory (MiB)", "compiled_peak_bytes", 2**-20, "{:.1f}"),
            ("measured peak growth (MiB)", "measured_peak_bytes", 2**-20, "{:.1f}"),
        ):
            extra = " | exponent" if key == "median_s" else ""
            lines += ["", f"## {mode}: {title}", "", f"| kind | {columns}{extra} |"]
            lines.append("|---" * (len(lengths) + 1 + bool(extra)) + "|")
            for kind in kinds:
                by_length = {r["length"]: r for r in rows if r["kind"] == kind}
                cells = [_cell(by_length[t][mode], key, scale, fmt) for t in lengths]
                if extra:
                    exponent = growth_exponent(by_length.values(), mode)
                    cells.append("" if exponent is None else f"{exponent:.2f}")
                lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    if reference_rows:
        lines += [
            "",
            "## chunked vs token-by-token reference (forward + backward, median ms)",
            "",
            "| kind | T | reference | chunked | speedup |",
            "|---|---|---|---|---|",
        ]
        for row in reference_rows:
            ref, chunked = row["reference"], row["chunked"]
            speedup = ref / chunked if ref and chunked else None
            cells = [f"{v * 1e3:.1f}" if v else "skip" for v in (ref, chunked)]
            cells.append(f"{speedup:.1f}x" if speedup else "")
            lines.append(f"| {row['kind']} | {row['length']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reference_comparison(args) -> list[dict]:
    """Forward + backward of impl="reference" vs impl="chunked" for kinds with an `impl`."""
    out = []
    comparison_args = argparse.Namespace(**{**vars(args), "lengths": args.reference_lengths})
    for kind in args.reference_kinds:
        if "impl" not in models.registry.block_default_config(kind):
            continue
        by_impl = {
            impl: sweep_kind(kind, comparison_args, {"impl": impl})
            for impl in ("chunked", "reference")
        }
        for chunked, reference in zip(by_impl["chunked"], by_impl["reference"], strict=True):
            seconds = {
                name: row["forward_backward"].get("median_s")
                for name, row in (("chunked", chunked), ("reference", reference))
            }
            out.append({"kind": kind, "length": chunked["length"], **seconds})
    return out


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in _names(s)]  # noqa: E731
    parser.add_argument("--kinds", type=_names, default=list(models.registered_blocks()))
    parser.add_argument("--lengths", type=ints, default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--num_heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget_s", type=float, default=60.0, help="per (kind, T), both modes")
    parser.add_argument("--max_memory_gb", type=float, default=4.0)
    parser.add_argument("--reference_kinds", type=_names, default=["lmm", "gdn", "atlas"])
    parser.add_argument("--reference_lengths", type=ints, default=[1024, 4096])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    known = set(models.registered_blocks())
    for kind in args.kinds:
        if kind not in known:
            parser.error(f"--kinds: unknown block kind {kind!r} (registered: {sorted(known)})")
    args.reference_kinds = [kind for kind in args.reference_kinds if kind in known]
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    header = run_header("benchmarks.layer_cost", argv)
    settings = (
        f"B=1, d_model={args.d_model}, num_heads={args.num_heads}, float32, each kind's "
        f"registered defaults, median of {args.repeats}, budget {args.budget_s:.0f} s per "
        f"(kind, T), compiled-peak limit {args.max_memory_gb} GiB"
    )
    rows = []
    stem = args.out / f"layer_cost_{header['backend']}"
    args.out.mkdir(parents=True, exist_ok=True)

    def write(reference_rows):
        payload = {**header, "settings": settings, "rows": rows, "reference": reference_rows}
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        stem.with_suffix(".md").write_text(markdown(header, settings, rows, reference_rows))

    for kind in args.kinds:
        rows += sweep_kind(kind, args)
        write([])  # a partial sweep still leaves its rows
    reference_rows = reference_comparison(args)
    write(reference_rows)
    print(stem.with_suffix(".md").read_text())
    return rows, reference_rows


if __name__ == "__main__":
    main()
