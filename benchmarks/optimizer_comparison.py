"""Train the default config with each optimizer for the same steps; report the losses.

    python -m benchmarks.optimizer_comparison [--steps 300] [--out benchmarks/results]

Writes `optimizer_comparison.json` and `.md` (machine, date, command, per-optimizer final
train loss, held-out loss and wall time). Muon-style optimizers get their customary higher
learning rate for the matrix group; the AdamW group keeps the default's 3e-3.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

from configs import base, default
from training import config_validation, loop

# name -> (learning rate of the matrix group, AdamW-group learning rate)
LEARNING_RATES = {
    "adamw": (3e-3, -1.0),
    "muon": (2e-2, 3e-3),
    "normuon": (2e-2, 3e-3),
    "apollo": (3e-3, -1.0),
    "apollo_mini": (3e-3, -1.0),
    "slimadam": (3e-3, -1.0),
}


def run_one(name: str, steps: int) -> dict:
    config = default.get_config()
    config.optim.name = name
    config.optim.learning_rate, config.optim.adamw_learning_rate = LEARNING_RATES[name]
    config.train.num_steps = steps
    config.eval.every_steps = steps
    config.checkpoint.every_steps = steps
    config.log.every_steps = steps
    config = config_validation.validate(config, base.get_config())
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        metrics = loop.run(config, workdir)
        seconds = time.perf_counter() - start
    return {
        "optimizer": name,
        "learning_rate": LEARNING_RATES[name][0],
        "train_loss": metrics["loss"],
        "eval_loss": metrics["eval_loss"],
        "seconds": seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    rows = [run_one(name, args.steps) for name in LEARNING_RATES]
    header = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.optimizer_comparison " + " ".join(sys.argv[1:]),
        "steps": args.steps,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "optimizer_comparison.json"), "w") as f:
        json.dump({**header, "rows": rows}, f, indent=2)
    lines = [
        f"Default config (`configs/default.py`), {args.steps} steps; {header['machine']}; "
        f"{header['date']}; `{header['command']}`",
        "",
        "| optimizer | lr (matrices) | train loss | held-out loss (nats/byte) | wall s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['optimizer']} | {row['learning_rate']:g} | {row['train_loss']:.3f} | "
            f"{row['eval_loss']:.3f} | {row['seconds']:.0f} |"
        )
    with open(os.path.join(args.out, "optimizer_comparison.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
