"""Context parallelism: compiled memory per device and time per step against mesh.context.

    python -m benchmarks.context_parallel [--kinds gdn,lmm,attention] [--contexts 1,2,4,8]
        [--seq_lens 16384,32768,65536] [--time_seq_len 16384] [--time_kinds gdn] [--steps 3]
    python -m benchmarks.context_parallel --kinds lmm --seq_lens 4096 --contexts 1,2,4,8 \
        --rows 1,2 --time_seq_len 4096 --time_kinds lmm

The real train step (`training.step.make_train_step`, AdamW, jitted with donation as in
`training.loop`) of `configs/default.py` with the kind's blocks (d_model 128, 2 layers), on 8
devices: context N splits each sequence over N devices and data = 8 / N takes the rest, with
`--rows` sequences per data group (global batch rows x 8 / N), so a device always holds
T / N tokens of each of its rows and the memory it needs should fall ~1/N. The deep memories
pipeline a shard's rows (`layers.context_parallel.deep_memory`): with b rows a shard waits
(N - 1) of b + N - 1 ticks, which more rows amortise. Memory: XLA's buffer assignment of the
compiled SPMD program, per device (`layer_cost.compiled_stats`: arguments + outputs +
temporaries - aliased), compiled only, never run. Time: median of `--steps` real steps at
`--time_seq_len` on random tokens, compared per token (a step at context N trains 1/N of the
tokens of context 1's). On a CPU the 8 devices are fake
(`--xla_force_host_platform_device_count=8`) and share its cores, so the time is the split's
total work (its overhead: two recurrence runs per shard, the ring's blocks), not a speed-up.

Results: `benchmarks/results/<name>_<backend>.{json,md}`.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import layer_cost  # noqa: E402
from benchmarks.model_comparison import text_config  # noqa: E402
from benchmarks.throughput import jitted_train_step  # noqa: E402
from configs import base  # noqa: E402
from training import config_validation  # noqa: E402
from training import sharding as sharding_lib  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
DEVICES = 8


def config_for(kind: str, seq_len: int, context: int, rows: int = 1):
    config = text_config(kind, 10)
    config.data.seq_len = seq_len
    config.mesh.data, config.mesh.context = -1, context
    config.train.batch_size = rows * DEVICES // context  # `rows` sequences per data group
    config = config_validation.validate(config, base.get_config())
    sharding_lib.check_context_parallel(config, context)
    return config


def batch_of(config, sharding, rng=None):
    """Random tokens (rng) or, without one, the batch's shapes only."""
    shape = (config.train.batch_size, config.data.seq_len)
    if rng is None:
        tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
        mask = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
        return {"inputs": tokens, "targets": tokens, "mask": mask}
    arrays = {
        "inputs": rng.integers(0, config.model.vocab_size, shape).astype(np.int32),
        "targets": rng.integers(0, config.model.vocab_size, shape).astype(np.int32),
        "mask": np.ones(shape, np.float32),
    }
    return {key: jax.device_put(value, sharding) for key, value in arrays.items()}


def measure(kind, seq_len, context, steps, rows=1):
    config = config_for(kind, seq_len, context, rows)
    mesh, jitted, state = jitted_train_step(config)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        compiled = jitted.lower(state, batch_of(config, batch_sharding)).compile()
        compile_s = time.perf_counter() - start
    row = {"kind": kind, "seq_len": seq_len, "context": context, "data": mesh.shape["data"],
           "rows": rows,
           "batch": config.train.batch_size, "compile_s": compile_s,
           **layer_cost.compiled_stats(compiled)}  # fmt: skip
    if steps:
        rng = np.random.default_rng(0)
        times = []
        for _ in range(steps + 1):  # the first is a warm-up
            batch = batch_of(config, batch_sharding, rng)
            begin = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - begin)
        row["step_s"] = statistics.median(times[1:])
    return row


def markdown(header, rows) -> str:
    lines = [
        "# Context parallelism: memory per device and time per step",
        "",
        f"{header['machine']}; backend {header['backend']}; jax {header['jax']}; {header['date']}",
        f"Last command: `{header['command']}`; XLA_FLAGS `{header['xla_flags']}`; each row's "
        "own command (a rerun keeps the rows it does not measure):",
        "",
        *(f"- `{command}`" for command in dict.fromkeys(r.get("command", "") for r in rows)),
        "",
        "Each device holds T / context tokens of each of its rows (batch rows x 8 / context "
        "over data = 8 / context). Memory: the compiled program's buffers per device "
        "(arguments + outputs + temporaries - aliased), compiled, not run. Time: median step "
        "on the same 8 devices, which on a CPU are fake and share its cores, per token (the "
        "split's total work and the deep memories' pipeline bubble, not a speed-up).",
        "",
        "| kind | T | rows per shard | context | memory per device | vs context 1 | step (s) | "
        "time per token vs context 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = {}
    for r in rows:
        key = (r["kind"], r["seq_len"], r.get("rows", 1))
        first.setdefault(key, r)
        base_row = first[key]
        peak = r["compiled_peak_bytes"]
        ratio = f"{peak / base_row['compiled_peak_bytes']:.2f}" if base_row["context"] == 1 else ""
        step = f"{r['step_s']:.2f}" if "step_s" in r else ""
        step_ratio = ""
        if "step_s" in r and "step_s" in base_row and base_row["context"] == 1:
            # Batch 8 / context: a step at context N trains 1/N of context 1's tokens.
            per_token = r["step_s"] / r["batch"], base_row["step_s"] / base_row["batch"]
            step_ratio = f"{per_token[0] / per_token[1]:.2f}"
        lines.append(f"| {r['kind']} | {r['seq_len']:,} | {key[2]} | {r['context']} | "
                     f"{peak / 2**20:,.0f} MiB | {ratio} | {step} | {step_ratio} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="gdn,lmm,attention")
    parser.add_argument("--seq_lens", type=_ints, default=[16384, 32768, 65536])
    parser.add_argument("--contexts", type=_ints, default=[1, 2, 4, 8])
    parser.add_argument("--rows", type=_ints, default=[1], help="sequences per data group")
    parser.add_argument("--time_seq_len", type=int, default=16384, help="0: no timing")
    # The LMM's steps at T 16K on 8 fake devices need more than a 24 GiB machine: timed at 4K.
    parser.add_argument("--time_kinds", default="gdn", help="the kinds timed")
    parser.add_argument("--name", default="context_parallel", help="results file stem")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if jax.device_count() != DEVICES:
        parser.error(f"needs {DEVICES} devices, found {jax.device_count()}")
    header = layer_cost.run_header("benchmarks.context_parallel", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.name}_{header['backend']}"
    # A rerun replaces the rows it measures again and keeps the others (kinds run apart).
    rows = []
    if stem.with_suffix(".json").exists():
        rows = json.loads(stem.with_suffix(".json").read_text())["rows"]

    def key(row):
        return row["kind"], row["seq_len"], row.get("rows", 1), row["context"]

    for kind in [k for k in args.kinds.split(",") if k]:
        for seq_len in args.seq_lens:
            for per_shard in args.rows:
                for context in args.contexts:
                    print(f"{kind} T={seq_len} rows={per_shard} context={context}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    timed = seq_len == args.time_seq_len and kind in args.time_kinds.split(",")
                    steps = args.steps if timed else 0
                    row = measure(kind, seq_len, context, steps, per_shard)
                    row.update(command=header["command"], date=header["date"])
                    rows = [r for r in rows if key(r) != key(row)] + [row]
                    rows.sort(key=key)
                    stem.with_suffix(".json").write_text(
                        json.dumps({**header, "rows": rows}, indent=1)
                    )
                    stem.with_suffix(".md").write_text(markdown(header, rows))
    print(stem.with_suffix(".md").read_text())
    return rows


if __name__ == "__main__":
    main()
