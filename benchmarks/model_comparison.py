"""Train every model kind at the same size and steps on MQAR and on the default text corpus.

    python -m benchmarks.model_comparison [--mqar_steps 0] [--text_steps 600] [--seed 0]
        [--models attention,gdn,...] [--no-match_params] [--niah_lengths 64,128]
        [--tasks mqar,text]

Per kind (default: every registered block kind, `models.registered_blocks()`):

- MQAR (8 key-value pairs, vocabulary 128, length 64, d_model 64, 2 layers): recall accuracy
  and loss on the held-out MQAR batches after `--mqar_steps` (0, the default: each kind's
  shipped recipe, `configs.mqar.recipe`, its learning rate, batch and steps); then S-NIAH
  on that model (`evals.recall`, "tokens" format: one key-value pair hidden among random
  tokens) at
  `--niah_lengths`, mean accuracy over needle depths 0, 0.25, ..., 1.
- text (`configs/default.py`: bytes of the Python standard library, d_model 128): held-out
  bits per byte after `--text_steps` (the held-out cross-entropy in bits; one token is one
  byte), and training tokens/s (the last logging interval: compile and evaluation excluded).
- decoding state: bytes of the MQAR model's `init_cache` at batch 1, as fixed + per-token
  parts (from the cache at two lengths): a KV cache grows with T, a memory state does not.

With `--match_params` (default) each kind's SwiGLU width (`model.mlp_dim`) is chosen so the
model has as close as possible the parameter count of the Transformer ("attention") of the
same config; the counts are in the table. The Titans kinds keep `configs/titans.py`'s MQAR
settings (window 8 / 16-token segments: recall past that must go through the memory) and
other neural-memory kinds its chunk size 8. `--seed` sets the model's initialisation and
the data order of both runs (`config.seed`); rows are kept per (kind, seed), so a second
seed is a second run of the command. `--tasks text` runs only the text part (a second seed of
the text ranking costs a fifth of the whole row for the slow kinds).

Writes `benchmarks/results/model_comparison.{json,md}` after every run, so a partial sweep
still leaves its rows. Rows of other (kind, seed) pairs are kept from the JSON already in
`--out` (`--no-keep_other_rows` starts afresh), so one slow kind can be rerun alone; every
row records the command and date that produced it, and the table lists them.

Two kinds at once go to two --out folders (each rewrites its JSON); `--merge A,B` then folds
their rows into --out's, keeping an old row's parts the new one lacks (`merge_rows`: the
MQAR and S-NIAH beside a `--tasks text` rerun) with the command that made them.
"""

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

import models
from benchmarks import layer_cost
from configs import base, default, mqar, titans
from errors import NonFiniteError
from evals import common, recall
from training import config_validation, loop

CACHE_LENGTHS = (1024, 2048)  # two lengths past every default window, for fixed + per token
# Table order: attention, then the linear-memory family, then the deep memories.
DISPLAY_ORDER = (
    "attention", "swa", "linear_attention", "gla", "deltanet", "gdn", "mom",
    "lmm", "mal", "mag", "mac", "atlas", "omeganet", "moneta", "yaad", "memora",
)  # fmt: skip


def model_config(kind: str):
    """The kind's MQAR config: `configs/titans.py` for the Titans kinds (short attention
    window / segments, so recall must go through the memory), `configs/mqar.py` otherwise;
    other neural-memory kinds (ATLAS, Miras) get the Titans chunk size."""
    if kind in titans.VARIANTS:
        return titans.get_config(kind)
    config = mqar.get_config(kind)
    if "architecture" in config.model[kind]:  # a neural (deep) memory kind
        config.model[kind].chunk_size = 8
    return config


def mqar_config(kind: str, steps: int):
    """The kind's MQAR config at `steps` (0: the steps of its shipped recipe,
    `configs.mqar.recipe`, with which it reaches its recall target)."""
    config = model_config(kind)
    config.data.mqar.vocab_size = 128
    config.train.num_steps = steps or config.train.num_steps
    return config


def text_config(kind: str, steps: int):
    config = default.get_config()
    template = model_config(kind)  # the kind's block options as its MQAR config sets them
    config.model.block_pattern = template.model.block_pattern
    config.model[kind] = template.model[kind]
    config.train.num_steps = steps
    return config


def resolved(config):
    return config_validation.validate(config, base.get_config())


def parameter_count(model_config) -> int:
    abstract = nnx.eval_shape(lambda: models.build_model(model_config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def parameter_targets() -> dict:
    """The Transformer's parameter counts on MQAR and on text, which every kind matches."""
    return {
        "mqar": parameter_count(resolved(mqar_config("attention", 1)).model),
        "text": parameter_count(resolved(text_config("attention", 1)).model),
    }


def match_parameters(config, target: int, multiple: int = 8):
    """Set model.mlp_dim (a multiple of `multiple`) so the parameter count is nearest
    `target`; the count is affine in mlp_dim, so two evaluations find the slope."""
    config = resolved(config)
    low, high = multiple, 64 * multiple
    counts = {}
    for width in (low, high):
        config.model.mlp_dim = width
        counts[width] = parameter_count(config.model)
    slope = (counts[high] - counts[low]) / (high - low)
    best = low + (target - counts[low]) / slope
    config.model.mlp_dim = max(multiple, multiple * round(best / multiple))
    return config


def cache_bytes(model_config) -> dict:
    """Decoding-cache bytes at batch 1 as fixed + per_token * T (from two lengths)."""

    def total(length):
        def build_cache():
            model = models.build_model(model_config, rngs=nnx.Rngs(0))
            return model.init_cache(1, length)

        leaves = jax.tree.leaves(jax.eval_shape(build_cache))
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)

    short, long = CACHE_LENGTHS
    per_token = (total(long) - total(short)) / (long - short)
    return {"fixed": total(short) - per_token * short, "per_token": per_token}


def train(config, workdir: str) -> dict:
    """Train and evaluate; a run that diverges (`NonFiniteError`) is a result too:
    {"diverged": "<the error's line>"}, so one kind's divergence does not end a sweep."""
    steps = config.train.num_steps
    config.eval.every_steps = config.checkpoint.every_steps = steps
    config.log.every_steps = max(1, steps // 4)  # the last interval is compile-free
    start = time.perf_counter()
    try:
        metrics = loop.run(resolved(config), workdir)
    except NonFiniteError as error:
        return {"diverged": str(error), "seconds": time.perf_counter() - start}
    return {
        "eval_loss": metrics["eval_loss"],
        "eval_accuracy": metrics["eval_accuracy"],
        "bits_per_token": metrics["eval_loss"] / math.log(2),
        "tokens_per_second": metrics.get("tokens_per_second"),
        "seconds": time.perf_counter() - start,
    }


def niah_accuracy(workdir: str, lengths, num_examples: int) -> dict:
    """S-NIAH (evals.recall) on the model saved in `workdir`: mean accuracy over the grid."""
    restored = common.restore(workdir)
    result = recall.run_task(
        "niah",
        restored.model,
        restored.config,
        context_lengths=lengths,
        num_examples=num_examples,
    )
    cells = result["cells"]
    return {
        "accuracy": float(np.mean([c["accuracy"] for c in cells])) if cells else None,
        "cells": cells,
    }


def _fmt(value, fmt):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt % value


def _diverged_or(run: dict, text: str) -> str:
    """A table cell: `text`, or where the run diverged, the step at which it did."""
    if "diverged" not in run:
        return text
    step = re.search(r"at step (\d+)", run["diverged"])
    return f"diverged (step {step.group(1)})" if step else "diverged"


TASKS = ("mqar", "text")


def _task_list(text: str) -> tuple[str, ...]:
    tasks = tuple(task for task in text.split(",") if task)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"--tasks: {text!r}: choose from {','.join(TASKS)}")
    return tasks


def _display_rank(row):
    kind = row["model"]
    rank = DISPLAY_ORDER.index(kind) if kind in DISPLAY_ORDER else len(DISPLAY_ORDER)
    return rank, kind, row.get("seed", 0)


def earlier_rows(out: str, kinds, seed: int) -> list[dict]:
    """Rows of the JSON already in `out` except those of `kinds` at `seed` (none if absent)."""
    path = os.path.join(out, "model_comparison.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        payload = json.load(f)
    rows = payload.get("rows", [])
    for row in rows:  # rows written before rows carried their own command and seed
        row.setdefault("command", payload.get("command", ""))
        row.setdefault("date", payload.get("date", ""))
        row.setdefault("machine", payload.get("machine", ""))
        row.setdefault("seed", 0)
    return [row for row in rows if row["model"] not in kinds or row["seed"] != seed]


RESULT_PARTS = ("mqar", "niah", "text")  # what a row holds beside its identity


def merge_rows(rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """Fold `new_rows` (runs made apart, e.g. two kinds' `--tasks text` at once into their own
    --out) into `rows`: a new row replaces its (model, seed) row, and the parts of the old row
    it lacks (MQAR and S-NIAH beside a text-only rerun) stay, recorded under `carried` with
    the command, date and machine that made them."""
    merged = list(rows)
    for new in new_rows:
        key = (new["model"], new.get("seed", 0))
        old = next((row for row in merged if (row["model"], row.get("seed", 0)) == key), None)
        if old is not None:
            merged.remove(old)
            new = dict(new)
            for part in RESULT_PARTS:
                if part in old and part not in new:
                    new[part] = old[part]
                    made_by = {name: old.get(name, "") for name in ("command", "date", "machine")}
                    carried = new.setdefault("carried", {})
                    carried[part] = old.get("carried", {}).get(part, made_by)
        merged.append(new)
    return merged


def write(rows, header, out):
    """`rows` (this run's and kept ones) -> model_comparison.json and .md in `out`."""
    os.makedirs(out, exist_ok=True)
    rows = sorted(rows, key=_display_rank)
    with open(os.path.join(out, "model_comparison.json"), "w") as f:
        json.dump({**header, "rows": rows}, f, indent=2)
    sources = {}  # (command, date) -> (machine, models), in first-seen order
    for row in rows:
        made = [(row, row["model"])]
        made += [(by, f"{row['model']} {part}") for part, by in row.get("carried", {}).items()]
        for by, what in made:
            source = (by["command"], by["date"])
            _, models_run = sources.setdefault(source, (by.get("machine", ""), []))
            models_run.append(what)
    lines = ["Rows from:"]
    lines += [f"- {date}{', ' + machine if machine else ''}: `{command}` ({', '.join(kinds)})"
              for (command, date), (machine, kinds) in sources.items()]  # fmt: skip
    lines += [
        "",
        "| model | seed | parameters (MQAR / text) | MQAR recall | MQAR loss | S-NIAH accuracy "
        "| text bits/byte | text tokens/s | cache bytes fixed | cache bytes per token "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mqar_row, text_row = row.get("mqar", {}), row.get("text", {})
        niah_row, cache = row.get("niah", {}), row.get("cache", {})
        seconds = mqar_row.get("seconds", 0) + text_row.get("seconds", 0)
        accuracy = mqar_row.get("eval_accuracy")
        recall = None if accuracy is None else 100 * accuracy
        niah = niah_row.get("accuracy")
        lines.append(
            f"| {row['model']} | {row.get('seed', 0)} | {row.get('parameters_mqar', '')} / "
            f"{row.get('parameters_text', '')} | "
            f"{_diverged_or(mqar_row, _fmt(recall, '%.1f%%'))} | "
            f"{_fmt(mqar_row.get('eval_loss'), '%.3f')} | "
            f"{_fmt(None if niah is None else 100 * niah, '%.1f%%')} | "
            f"{_diverged_or(text_row, _fmt(text_row.get('bits_per_token'), '%.3f'))} | "
            f"{_fmt(text_row.get('tokens_per_second'), '%.0f')} | "
            f"{_fmt(cache.get('fixed'), '%.0f')} | {_fmt(cache.get('per_token'), '%.0f')} | "
            f"{seconds:.0f} |"
        )
    with open(os.path.join(out, "model_comparison.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def compare(kind: str, args, targets: dict, rows: list, header: dict) -> None:
    """Train and evaluate one kind, writing the results after each stage."""
    mqar_run = mqar_config(kind, args.mqar_steps)
    text_run = text_config(kind, args.text_steps)
    mqar_run.seed = text_run.seed = args.seed
    if args.match_params:
        mqar_run = match_parameters(mqar_run, targets["mqar"])
        text_run = match_parameters(text_run, targets["text"])
    mqar_run, text_run = resolved(mqar_run), resolved(text_run)
    row = {
        "model": kind,
        "seed": args.seed,
        "command": header["command"],
        "date": header["date"],
        "machine": header["machine"],
        "parameters_mqar": parameter_count(mqar_run.model),
        "parameters_text": parameter_count(text_run.model),
        "mlp_dim_mqar": mqar_run.model.mlp_dim,
        "mlp_dim_text": text_run.model.mlp_dim,
        "cache": cache_bytes(mqar_run.model),
    }
    rows.append(row)
    if "mqar" in args.tasks:
        with tempfile.TemporaryDirectory() as workdir:
            row["mqar"] = train(mqar_run, workdir)
            write(rows, header, args.out)
            if args.niah_lengths and "diverged" not in row["mqar"]:
                row["niah"] = niah_accuracy(workdir, args.niah_lengths, args.niah_examples)
                write(rows, header, args.out)
    if "text" in args.tasks:
        with tempfile.TemporaryDirectory() as workdir:
            row["text"] = train(text_run, workdir)
    write(rows, header, args.out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mqar_steps", type=int, default=0, help="0: each kind's recipe")
    parser.add_argument("--text_steps", type=int, default=600, help="configs/default.py's")
    parser.add_argument("--seed", type=int, default=0, help="config.seed of both runs")
    parser.add_argument("--models", default=",".join(models.registered_blocks()))
    parser.add_argument("--match_params", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--niah_lengths", type=common.int_list, default=[64, 128], help="empty: no S-NIAH"
    )
    parser.add_argument("--niah_examples", type=int, default=64)
    parser.add_argument(
        "--tasks", type=_task_list, default=TASKS, help="mqar (then S-NIAH on its model), text"
    )
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument(
        "--keep_other_rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the rows of other kinds from the JSON in --out",
    )
    parser.add_argument(
        "--merge",
        default="",
        help="comma-separated --out folders of earlier runs: fold their rows into --out "
        "(`merge_rows`) and train nothing",
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge_folders(args.merge.split(","), args.out)
    kinds = [kind for kind in args.models.split(",") if kind]
    unknown = sorted(set(kinds) - set(models.registered_blocks()))
    if unknown:
        parser.error(f"--models: unknown kinds {unknown} (see models.registered_blocks())")
    header = layer_cost.run_header("benchmarks.model_comparison", argv)
    header["settings"] = vars(args) | {"out": str(args.out)}
    targets = parameter_targets()
    header["target_parameters"] = targets
    rows = earlier_rows(args.out, kinds, args.seed) if args.keep_other_rows else []
    for kind in kinds:
        compare(kind, args, targets, rows, header)
    print(open(os.path.join(args.out, "model_comparison.md")).read())
    return rows


def merge_folders(folders, out):
    """--merge: the rows of each folder's model_comparison.json folded into out's (json and
    md; `python -m benchmarks.plots` redraws the figure); out's header is kept."""
    with open(os.path.join(out, "model_comparison.json")) as f:
        payload = json.load(f)
    header = {key: value for key, value in payload.items() if key != "rows"}
    rows = earlier_rows(out, (), seed=0)  # every row, with its provenance filled in
    for folder in folders:
        with open(os.path.join(folder, "model_comparison.json")) as f:
            rows = merge_rows(rows, json.load(f)["rows"])
    write(rows, header, out)
    return rows


if __name__ == "__main__":
    main()
