"""Train every model at the same tiny size and steps on MQAR and on the default text corpus.

    python -m benchmarks.model_comparison [--mqar_steps 500] [--text_steps 300] [--models gdn,...]

Writes `benchmarks/results/model_comparison.{json,md}` after every run, so a partial sweep
still leaves its rows. MQAR: 8 key-value pairs, vocabulary 128, length 64; text: the default
config's corpus and sizes. One seed: a first look, not a tuned comparison.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

from configs import base, default, mqar, titans
from training import config_validation, loop

MODELS = ("attention", "gdn", "linear_attention", "mom", "lmm", "mal", "mag", "mac")


def model_config(kind: str):
    """The kind's MQAR config: `configs/titans.py` for the Titans kinds (short attention
    window / segments, so recall must go through the memory), `configs/mqar.py` otherwise."""
    return titans.get_config(kind) if kind in titans.VARIANTS else mqar.get_config(kind)


def mqar_config(kind: str, steps: int):
    config = model_config(kind)
    config.data.mqar.vocab_size = 128
    config.train.num_steps = steps
    return config


def text_config(kind: str, steps: int):
    config = default.get_config()
    template = model_config(kind)  # the kind's block options as its MQAR config sets them
    config.model.block_pattern = template.model.block_pattern
    config.model[kind] = template.model[kind]
    config.train.num_steps = steps
    return config


def train(config) -> dict:
    steps = config.train.num_steps
    config.eval.every_steps = config.checkpoint.every_steps = config.log.every_steps = steps
    config = config_validation.validate(config, base.get_config())
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        metrics = loop.run(config, workdir)
    return {
        "eval_loss": metrics["eval_loss"],
        "eval_accuracy": metrics["eval_accuracy"],
        "seconds": time.perf_counter() - start,
    }


def write(rows, header, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "model_comparison.json"), "w") as f:
        json.dump({**header, "rows": rows}, f, indent=2)
    lines = [
        f"{header['machine']}; {header['date']}; `{header['command']}`",
        "",
        "| model | MQAR recall accuracy | MQAR held-out loss | text held-out loss (nats/byte) "
        "| wall s (MQAR + text) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        mqar_row, text_row = row.get("mqar", {}), row.get("text", {})
        accuracy = f"{100 * mqar_row['eval_accuracy']:.1f}%" if mqar_row else ""
        lines.append(
            f"| {row['model']} | {accuracy} | {mqar_row.get('eval_loss', float('nan')):.3f} | "
            f"{text_row.get('eval_loss', float('nan')):.3f} | "
            f"{mqar_row.get('seconds', 0) + text_row.get('seconds', 0):.0f} |"
        )
    with open(os.path.join(out, "model_comparison.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mqar_steps", type=int, default=500)
    parser.add_argument("--text_steps", type=int, default=300)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    header = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.model_comparison " + " ".join(sys.argv[1:]),
    }
    rows = []
    for kind in args.models.split(","):
        row = {"model": kind, "mqar": train(mqar_config(kind, args.mqar_steps))}
        rows.append(row)
        write(rows, header, args.out)
        row["text"] = train(text_config(kind, args.text_steps))
        write(rows, header, args.out)
    print(open(os.path.join(args.out, "model_comparison.md")).read())


if __name__ == "__main__":
    main()
