"""Training throughput (tokens/s) and estimated model FLOPs utilisation of every model kind.

    python -m benchmarks.throughput [--models attention,gdn,...] [--sizes tiny,small]
        [--steps 20] [--peak_flops 0]

Sizes: "tiny" is each kind's MQAR config (`benchmarks.model_comparison.mqar_config`:
d_model 64, 2 layers, batch 32 x 64 tokens), "small" its text config (`configs/default.py`
with the kind's blocks: d_model 128, 2 layers, batch 16 x 128 bytes). The step is the real
one (`training.step.make_train_step`, AdamW, jitted with donation as in `training.loop`) on
real batches; after a compile and one warm-up step, `--steps` steps are timed one by one and
the median gives tokens/s.

FLOPs per step, two ways (both in the results):
- "xla": `jax.jit(step).lower(...).compile().cost_analysis()["flops"]`. Best effort: XLA
  counts a loop body (`lax.scan`: the recurrences, the MAC segments) once, not per
  iteration, so it undercounts the scan-based models.
- "6NT": 6 x (non-embedding parameters + the d_model x vocab output matmul) per token, plus
  PaLM's attention term 12 x layers x heads x head_dim x T_eff per token for the "attention"
  / "swa" blocks (T_eff = min(T, window)); the memory recurrences are not counted.
MFU = achieved FLOP/s / peak. The peak is `--peak_flops` if given, else measured here: the
median FLOP/s of a jitted 1024 x 1024 float32 matmul on the same device and XLA flags (so
on a CPU "MFU" is relative to what XLA's own matmul reaches, not to a datasheet number).

Results: `benchmarks/results/throughput_<backend>.json` and `.md`, written after each row.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import data as data_lib
import optim
from benchmarks import layer_cost
from benchmarks.model_comparison import mqar_config, text_config
from configs import base
from training import config_validation
from training import sharding as sharding_lib
from training.state import create_train_state, model_spec
from training.step import make_train_step

RESULTS = pathlib.Path(__file__).parent / "results"
SIZES = {"tiny": mqar_config, "small": text_config}


def measured_peak_flops(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a jitted float32 [size, size] matmul (median of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def estimated_flops_per_token(config, abstract_params) -> dict:
    """6 N per token (N: non-embedding parameters + the output matmul) + the attention term."""
    model = config.model
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
    # The embedding lookup costs no FLOPs but the d_model x vocab output matmul does: tied,
    # that matrix is the embedding (count it once); untied, the lookup table is left out.
    lookup_only = 0 if model.tie_embeddings else model.vocab_size * model.d_model
    matmul_params = total - lookup_only
    pattern = tuple(model.block_pattern)
    head_width = model.num_heads * (model.head_dim or model.d_model // model.num_heads)
    attention = 0
    for layer in range(model.num_layers):
        kind = pattern[layer % len(pattern)]
        if kind in ("attention", "swa"):
            window = model[kind].window or config.data.seq_len
            attention += 12 * head_width * min(config.data.seq_len, window)
    return {"parameters": total, "flops_per_token": 6 * matmul_params + attention}


def jitted_train_step(config):
    """(mesh, jitted train step, initial state) as `training.loop.run` builds them."""
    mesh = sharding_lib.make_mesh(config.mesh)
    spec = model_spec(config.model, config.seed)
    steps = config.train.num_steps
    schedule = optim.learning_rate_schedule(config.optim, steps)
    tx = optim.build(config.optim, spec.abstract_params, spec.logical_specs, num_steps=steps)
    state, shardings = create_train_state(config, spec, tx, mesh)
    step = jax.jit(
        make_train_step(spec, tx, schedule, config.train),
        in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
        out_shardings=(shardings, sharding_lib.replicated(mesh)),
        donate_argnums=0,
    )
    return mesh, step, state


def build_step(config):
    """(jitted train step, initial state, batch iterator) as `training.loop.run` builds them."""
    mesh, step, state = jitted_train_step(config)
    batches = data_lib.build_train_iterator(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=0,
        process_count=1,
    )

    def global_batches():
        while True:
            yield sharding_lib.global_batch(next(batches), mesh)

    return step, state, global_batches()


def measure(kind: str, size: str, steps: int, peak_flops: float) -> dict:
    config = config_validation.validate(SIZES[size](kind, steps + 2), base.get_config())
    step, state, batches = build_step(config)
    batch = next(batches)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    xla_flops = layer_cost.compiled_stats(compiled)["xla_flops"]
    state, _ = compiled(state, batch)  # warm-up
    times = []
    for _ in range(steps):
        batch = next(batches)
        jax.block_until_ready(batch)
        begin = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - begin)
    seconds = statistics.median(times)
    tokens = config.train.batch_size * config.data.seq_len
    estimate = estimated_flops_per_token(config, model_spec(config.model, 0).abstract_params)
    row = {
        "model": kind,
        "size": size,
        "parameters": estimate["parameters"],
        "tokens_per_step": tokens,
        "step_s": seconds,
        "tokens_per_second": tokens / seconds,
        "compile_s": compile_s,
        "xla_flops_per_step": xla_flops,
        "estimated_flops_per_step": estimate["flops_per_token"] * tokens,
    }
    for source in ("xla", "estimated"):
        flops = row[f"{source}_flops_per_step"]
        row[f"mfu_{source}"] = None if flops is None else flops / seconds / peak_flops
    return row


def markdown(header, rows) -> str:
    lines = [
        "# Training throughput and model FLOPs utilisation",
        "",
        f"{header['machine']}; backend {header['backend']}; jax {header['jax']}; {header['date']}",
        f"Command: `{header['command']}`; XLA_FLAGS `{header['xla_flags']}`",
        f"Peak: {header['peak_flops'] / 1e9:.1f} GFLOP/s ({header['peak_source']}). MFU (6NT) "
        "counts 6 x matmul parameters + attention per token; MFU (XLA) uses XLA's cost "
        "analysis, which counts a scan body once (undercounts the recurrent models).",
        "",
        "| model | size | parameters | tokens/step | ms/step | tokens/s | GFLOP/step (6NT) "
        "| GFLOP/step (XLA) | MFU (6NT) | MFU (XLA) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(x):
        return "" if x is None else f"{100 * x:.1f}%"

    for r in rows:
        xla = "" if r["xla_flops_per_step"] is None else f"{r['xla_flops_per_step'] / 1e9:.3f}"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['parameters']:,} | {r['tokens_per_step']} | "
            f"{1e3 * r['step_s']:.1f} | {r['tokens_per_second']:,.0f} | "
            f"{r['estimated_flops_per_step'] / 1e9:.3f} | {xla} | {pct(r['mfu_estimated'])} | "
            f"{pct(r['mfu_xla'])} |"
        )
    return "\n".join(lines) + "\n"


def checked_sizes(parser, text) -> list[str]:
    """--sizes "tiny,small" -> the names, each one of SIZES (else the parser's error)."""
    sizes = [s for s in text.split(",") if s]
    for size in sizes:
        if size not in SIZES:
            parser.error(f"--sizes: {size!r} is not one of {', '.join(SIZES)}")
    return sizes


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(layer_cost.models.registered_blocks()))
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak_flops", type=float, default=0.0, help="0: measure a matmul")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = checked_sizes(parser, args.sizes)
    header = layer_cost.run_header("benchmarks.throughput", argv)
    if args.peak_flops > 0:
        header.update(peak_flops=args.peak_flops, peak_source="--peak_flops")
    else:
        header.update(
            peak_flops=measured_peak_flops(),
            peak_source="measured: jitted 1024x1024 float32 matmul, same XLA flags",
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"throughput_{header['backend']}"
    rows = []
    for kind in [m for m in args.models.split(",") if m]:
        for size in sizes:
            print(f"{kind} {size}", file=sys.stderr, flush=True)
            rows.append(measure(kind, size, args.steps, header["peak_flops"]))
            stem.with_suffix(".json").write_text(json.dumps({**header, "rows": rows}, indent=1))
            stem.with_suffix(".md").write_text(markdown(header, rows))
    print(stem.with_suffix(".md").read_text())
    return rows


if __name__ == "__main__":
    main()
