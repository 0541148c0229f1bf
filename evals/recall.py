"""Recall evals: the MQAR sweep (Zoology protocol) and single-needle-in-a-haystack (S-NIAH).

MQAR (Arora et al. 2023, "Zoology"): at fixed model width, recall accuracy over a grid of
(sequence length, number of key-value pairs), on the fixed MQAR eval stream of
`data.mqar` (same vocabulary, query placement and noise as training; only the two swept
values change). A cell needs 2 * pairs <= seq_len / 2 (Zoology's queries live in the second
half) and pairs < vocab / 2 - 1; other cells are listed as skipped. accuracy = the share
of queried values predicted by argmax, loss = mean cross-entropy at the query positions.

S-NIAH (`data.niah`): accuracy over (context length, needle depth). Format "text" for
byte-level models (passkey sentence in filler bytes), "tokens" for token models (an MQAR
key-value pair among random tokens, vocabulary of the model's data). accuracy = the share
of answer tokens predicted by argmax (teacher-forced); exact_match = the share of examples
with every answer token right (= greedy decoding of the answer).

    python -m evals.recall --workdir=DIR [--task=mqar|niah|all] [--seq_lens=64,128,256]
        [--num_kv_pairs=4,8,16,32,64] [--context_lengths=...] [--depths=0,0.25,0.5,0.75,1]
        [--num_examples=128] [--batch_size=32] [--step=N]

writes DIR/evals/recall_<task>_step<N>.json and prints a table per task.
"""

import math

import ml_collections
import numpy as np

from data import mqar, niah
from errors import ConfigError
from evals import common

TASKS = ("mqar", "niah")
DEFAULT_KV_PAIRS = (4, 8, 16, 32, 64)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _masked_mean(values, mask):
    return float(np.sum(values * mask) / max(np.sum(mask), 1.0))


def mqar_cell_problem(mqar_config, seq_len: int, num_kv_pairs: int) -> str | None:
    """Why (seq_len, num_kv_pairs) is not a valid MQAR cell, or None if it is."""
    num_queries = mqar_config.num_queries or num_kv_pairs
    if num_kv_pairs > mqar_config.vocab_size // 2 - 1:  # keys come from [1, vocab / 2)
        return f"{num_kv_pairs} pairs need more than vocab_size {mqar_config.vocab_size} // 2 keys"
    if 4 * num_kv_pairs > seq_len or (seq_len - 2 * num_kv_pairs) // 2 < num_queries:
        return f"{num_kv_pairs} pairs and their queries do not fit in {seq_len} tokens"
    return None


def mqar_sweep(
    model,
    mqar_config,
    *,
    seq_lens,
    num_kv_pairs,
    num_examples: int = 128,
    batch_size: int = 32,
) -> dict:
    """MQAR recall over the grid seq_lens x num_kv_pairs.

    mqar_config: a `data.mqar` section (vocab_size, num_queries, power_a,
    random_non_queries). Returns {"cells": [{seq_len, num_kv_pairs, accuracy, loss,
    num_examples}], "skipped": [{seq_len, num_kv_pairs, reason}]}.
    """
    cells, skipped = [], []
    for seq_len in seq_lens:
        for pairs in num_kv_pairs:
            problem = mqar_cell_problem(mqar_config, seq_len, pairs)
            if problem:
                skipped.append({"seq_len": seq_len, "num_kv_pairs": pairs, "reason": problem})
                continue
            data_config = ml_collections.ConfigDict(
                {"seq_len": seq_len, "mqar": mqar_config.to_dict()}
            )
            data_config.mqar.num_kv_pairs = pairs
            make_example = mqar.MQARExamples(
                data_config, seed=mqar.EVAL_SEED, stream=mqar.EVAL_STREAM
            )
            examples = [make_example(index) for index in range(num_examples)]
            batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
            loss, hit = common.token_scores(
                model, batch["inputs"], batch["targets"], batch_size=batch_size
            )
            cells.append(
                {
                    "seq_len": seq_len,
                    "num_kv_pairs": pairs,
                    "accuracy": _masked_mean(hit, batch["mask"]),
                    "loss": _masked_mean(loss, batch["mask"]),
                    "num_examples": num_examples,
                }
            )
    return {"cells": cells, "skipped": skipped}


def niah_grid(
    model,
    *,
    format: str,
    vocab_size: int,
    context_lengths,
    depths,
    num_examples: int = 64,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """S-NIAH over the grid context_lengths x depths (format and vocab_size: `data.niah`).

    Returns {"format", "cells": [{context_length, depth, accuracy, exact_match,
    num_examples}], "skipped": [{context_length, reason}]} (a context too short for the
    needle, query and answer is skipped).
    """
    cells, skipped = [], []
    for length in context_lengths:
        if length <= niah.overhead(format):
            reason = f"shorter than the needle, query and answer ({niah.overhead(format) + 1})"
            skipped.append({"context_length": length, "reason": reason})
            continue
        for depth in depths:
            batch = niah.niah_batch(
                format,
                context_length=length,
                depth=depth,
                indices=range(num_examples),
                seed=seed,
                vocab_size=vocab_size,
            )
            _, hit = common.token_scores(
                model, batch["inputs"], batch["targets"], batch_size=batch_size
            )
            mask = batch["mask"]
            all_right = np.all(hit | (mask == 0), axis=1)
            cells.append(
                {
                    "context_length": length,
                    "depth": float(depth),
                    "accuracy": _masked_mean(hit, mask),
                    "exact_match": float(np.mean(all_right)),
                    "num_examples": num_examples,
                }
            )
    return {"format": format, "cells": cells, "skipped": skipped}


def niah_format(config) -> tuple[str, int]:
    """(format, vocab_size) of S-NIAH for a run's config: "text" for byte-level runs, else
    "tokens" over the data's vocabulary (MQAR's vocab_size, or data.vocab_size)."""
    if config.data.name == "text":
        return "text", 256
    if config.data.name == "mqar":
        return "tokens", config.data.mqar.vocab_size
    return "tokens", config.data.vocab_size or config.model.vocab_size


def mqar_config_of(config) -> ml_collections.ConfigDict:
    """The `data.mqar` section to sweep: the run's own for MQAR runs; for other runs the
    defaults with the vocabulary cut to the model's (every token must be embeddable)."""
    mqar_config = ml_collections.ConfigDict(config.data.mqar.to_dict())
    if config.data.name != "mqar":
        mqar_config.vocab_size = min(mqar_config.vocab_size, config.model.vocab_size)
    return mqar_config


def run_task(
    task,
    model,
    config,
    *,
    seq_lens=None,
    num_kv_pairs=None,
    context_lengths=None,
    depths=None,
    num_examples=128,
    batch_size=32,
) -> dict:
    """One recall task on `model` with the defaults of its run `config` (documented in the
    CLI's --help): the sweep's or grid's result dict."""
    train_length = config.data.seq_len
    if task == "mqar":
        return mqar_sweep(
            model,
            mqar_config_of(config),
            seq_lens=seq_lens or [train_length, 2 * train_length, 4 * train_length],
            num_kv_pairs=num_kv_pairs or list(DEFAULT_KV_PAIRS),
            num_examples=num_examples,
            batch_size=batch_size,
        )
    if task == "niah":
        format, vocab_size = niah_format(config)
        return niah_grid(
            model,
            format=format,
            vocab_size=vocab_size,
            context_lengths=context_lengths or [train_length, 2 * train_length, 4 * train_length],
            depths=DEFAULT_DEPTHS if depths is None else depths,
            num_examples=num_examples,
            batch_size=batch_size,
        )
    raise ConfigError(f"task: unknown recall task {task!r} (choose {', '.join(TASKS)})")


def summary_scalars(task: str, result: dict) -> dict[str, float]:
    """Flat scalars for TensorBoard / metrics.jsonl: one per cell, plus the mean accuracy."""
    scalars = {}
    for cell in result["cells"]:
        if task == "mqar":
            name = f"recall/mqar/T{cell['seq_len']}_kv{cell['num_kv_pairs']}"
        else:
            name = f"recall/niah/T{cell['context_length']}_depth{cell['depth']:.2f}"
        scalars[name] = cell["accuracy"]
    if result["cells"]:
        scalars[f"recall/{task}_mean"] = float(np.mean([c["accuracy"] for c in result["cells"]]))
    return scalars


def _table(task, result) -> str:
    if task == "mqar":
        columns = ["seq_len", "num_kv_pairs", "accuracy", "loss"]
    else:
        columns = ["context_length", "depth", "accuracy", "exact_match"]
    return common.format_table(result["cells"], columns)


def parse_args(argv):
    parser = common.ArgumentParser(
        prog="python -m evals.recall", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="a workdir written by train.py")
    parser.add_argument("--task", choices=(*TASKS, "all"), default="all")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
    lengths = "comma-separated (default: 1, 2 and 4 x the run's data.seq_len)"
    parser.add_argument("--seq_lens", type=common.int_list, help=f"MQAR lengths, {lengths}")
    parser.add_argument(
        "--num_kv_pairs", type=common.int_list, help="MQAR pairs (default: 4,8,16,32,64)"
    )
    parser.add_argument("--context_lengths", type=common.int_list, help=f"NIAH, {lengths}")
    parser.add_argument(
        "--depths", type=common.float_list, help="NIAH depths (default: 0,0.25,0.5,0.75,1)"
    )
    parser.add_argument("--num_examples", type=int, default=128, help="per cell")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.num_examples < 1 or args.batch_size < 1:
        parser.error("--num_examples and --batch_size must be >= 1")
    if args.depths and not all(0.0 <= d <= 1.0 and math.isfinite(d) for d in args.depths):
        parser.error(f"--depths: every depth must be in [0, 1], got {args.depths}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    restored = common.restore(args.workdir, args.step)
    tasks = TASKS if args.task == "all" else (args.task,)
    for task in tasks:
        result = run_task(
            task,
            restored.model,
            restored.config,
            seq_lens=args.seq_lens,
            num_kv_pairs=args.num_kv_pairs,
            context_lengths=args.context_lengths,
            depths=args.depths,
            num_examples=args.num_examples,
            batch_size=args.batch_size,
        )
        result = {"task": task, "step": restored.step, "workdir": args.workdir, **result}
        path = common.write_results(args.workdir, f"recall_{task}", result)
        print(f"{task} at step {restored.step} ({path}):")
        print(_table(task, result))
        for skipped in result["skipped"]:
            print(f"  skipped: {skipped}")


if __name__ == "__main__":
    import sys

    sys.exit(common.run_cli(main))
