"""MQAR recall of each model kind through `train.py` with its shipped recall config: the
learning-rate sweep that chose the configs' values, and the check at other seeds.

    python -m benchmarks.recall_sweep --kinds attention,gdn --learning_rates 1e-3,3e-3,1e-2
    python -m benchmarks.recall_sweep --kinds attention,gdn --seeds 1,2     # shipped lr
    python -m benchmarks.recall_sweep --kinds attention,gdn --num_kv_pairs 16 --seq_len 128

Every run is `python train.py --config=<the kind's config>` (`recall_config`) in a
subprocess with overrides for the seed, learning rate and (optionally) the task size; with
a larger task than the shipped one (`--num_kv_pairs` / `--seq_len`) the step count is scaled
by `--steps_multiplier` (Zoology-style: twice the steps at 16 pairs, T 128). Runs go to a
pool of one worker per CPU core, each pinned to its core with single-threaded XLA, so two
runs on two cores take the time of one; `--cores_per_run 2` instead gives each run two cores
and XLA's own threads (a slow kind, ATLAS, alone on the machine). Each run's eval recall
(eval accuracy on the held-out MQAR stream: the fraction of queried keys whose value is the
argmax) is read from its `metrics.jsonl` at every eval step.

Results accumulate in `benchmarks/results/mqar_recall.{json,md}`: a new run replaces the
row of the same (kind, pairs, length, batch, lr, seed, steps) and keeps the others, so a sweep can
be extended kind by kind. The table gives the final recall, the first step at which recall
reached the kind's target (`configs.mqar.RECALL_TARGETS`) and the wall time. With
`--keep_workdirs DIR` every run's workdir (final checkpoint included) stays under DIR, so the
trained model can be scored further without retraining (`python -m evals.recall
--workdir=DIR/<run>`: the Zoology grid, S-NIAH).
"""

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time

import models
from configs import atlas, miras, mom, mqar, titans

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
SINGLE_THREADED_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# What identifies a run: a new run replaces the stored row with the same values.
KEY = ("kind", "num_kv_pairs", "seq_len", "batch_size", "lr", "seed", "steps")


def _family(kind: str):
    """(config module, its path, variant) of a kind's shipped recall config."""
    for module in (titans, atlas, miras):
        if kind in module.VARIANTS:
            return module, module.__name__.replace(".", "/") + ".py", kind
    if kind == "mom":
        return mom, "configs/mom.py", ""
    return mqar, "configs/mqar.py", kind


def recall_config(kind: str) -> str:
    """The `--config=` argument of a kind's shipped recall config."""
    _, path, variant = _family(kind)
    return f"{path}:{variant}" if variant else path


def shipped(kind: str):
    """The kind's shipped recall config (a ConfigDict), from the same config file."""
    module, _, variant = _family(kind)
    return module.get_config(variant) if variant else module.get_config()


def workdir_name(job: dict) -> str:
    """Where `--keep_workdirs` keeps a run: one folder per row key."""
    return (f"{job['kind']}_p{job['num_kv_pairs']}_t{job['seq_len']}_b{job['batch_size']}"
            f"_lr{job['lr']:g}_s{job['seed']}_n{job['steps']}")  # fmt: skip


def _workdir(job, keep_dir):
    """A temporary workdir, or (with keep_dir) a fresh kept one under it."""
    if not keep_dir:
        return tempfile.TemporaryDirectory()
    path = os.path.join(keep_dir, workdir_name(job))
    shutil.rmtree(path, ignore_errors=True)  # a rerun replaces the earlier run
    os.makedirs(path)
    return contextlib.nullcontext(path)


def run_one(job: dict, cores: "queue.Queue[tuple[int, ...]]", keep_dir: str = "") -> dict:
    """Train one job on a free set of cores; its eval recall per step from metrics.jsonl."""
    core_set = cores.get()
    try:
        with _workdir(job, keep_dir) as workdir:
            command = [sys.executable, "train.py", f"--config={recall_config(job['kind'])}",
                       f"--workdir={workdir}", *job["overrides"]]  # fmt: skip
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            if len(core_set) == 1:
                env["XLA_FLAGS"] = SINGLE_THREADED_XLA
            start = time.perf_counter()
            result = subprocess.run(
                command,
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                preexec_fn=lambda: os.sched_setaffinity(0, set(core_set)),
            )
            seconds = time.perf_counter() - start
            curve = {}
            metrics_path = os.path.join(workdir, "metrics.jsonl")
            if os.path.exists(metrics_path):
                with open(metrics_path) as f:
                    for line in f:
                        record = json.loads(line)
                        if "eval_accuracy" in record:
                            curve[record["step"]] = record["eval_accuracy"]
    finally:
        cores.put(core_set)
    row = {key: job[key] for key in KEY}
    target = mqar.RECALL_TARGETS.get(job["kind"])
    reached = [step for step, value in sorted(curve.items()) if target and value >= target]
    row.update(
        recall=curve[max(curve)] if curve else None,
        curve=curve,
        target=target,
        step_reached=reached[0] if reached else None,
        seconds=round(seconds, 1),
        cores=len(core_set),
        returncode=result.returncode,
        error=_last_line(result.stderr, result.returncode) if result.returncode else "",
        command=" ".join(command[1:]).replace(workdir, "WORKDIR"),
        workdir=workdir if keep_dir else "",
        date=datetime.date.today().isoformat(),
    )
    return row


def _last_line(stderr: str, returncode: int) -> str:
    """A failed run's last stderr line; a run killed by a signal (ended by hand) may have none."""
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {returncode}, no stderr"


def jobs_for(args) -> list[dict]:
    jobs = []
    for kind in args.kinds:
        config = shipped(kind)
        pairs = args.num_kv_pairs or config.data.mqar.num_kv_pairs
        seq_len = args.seq_len or config.data.seq_len
        larger = (pairs, seq_len) != (config.data.mqar.num_kv_pairs, config.data.seq_len)
        steps = config.train.num_steps * (args.steps_multiplier if larger else 1)
        steps = args.num_steps or steps
        batch_size = args.batch_size or config.train.batch_size
        every = max(1, steps // args.evals_per_run)
        for lr in args.learning_rates or [config.optim.learning_rate]:
            for seed in args.seeds:
                overrides = [
                    f"--config.seed={seed}",
                    f"--config.optim.learning_rate={lr}",
                    f"--config.train.num_steps={steps}",
                    f"--config.data.mqar.num_kv_pairs={pairs}",
                    f"--config.data.seq_len={seq_len}",
                    f"--config.train.batch_size={batch_size}",
                    f"--config.eval.every_steps={every}",
                    f"--config.log.every_steps={every}",
                    f"--config.checkpoint.every_steps={steps}",
                ]
                jobs.append(dict(kind=kind, num_kv_pairs=pairs, seq_len=seq_len, lr=lr,
                                 batch_size=batch_size, seed=seed, steps=steps,
                                 overrides=overrides))  # fmt: skip
    return jobs


def _key(row):
    return tuple(row[k] for k in KEY)


def load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def write(rows: list[dict], out: str) -> None:
    order = {kind: i for i, kind in enumerate(models.registered_blocks())}
    rows = sorted(rows, key=lambda r: (r["num_kv_pairs"], order.get(r["kind"], 99), _key(r)))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "mqar_recall.json"), "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    lines = [
        "MQAR eval recall through `train.py` and each kind's shipped recall config "
        "(`python -m benchmarks.recall_sweep`; one worker per core, each pinned, "
        "single-threaded XLA). `reached` = first eval step with recall >= target.",
        "",
        "| kind | pairs | T | batch | lr | seed | steps | recall | target | reached at | wall s "
        "| date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recall = "failed: " + r["error"] if r["returncode"] else f"{100 * r['recall']:.1f}%"
        if r.get("stopped_at"):  # a run ended early by hand: recall at its last eval
            recall = f"{100 * r['recall']:.1f}% at step {r['stopped_at']} (stopped)"
        target = "" if r["target"] is None else f"{100 * r['target']:.0f}%"
        reached = "—" if r["step_reached"] is None else str(r["step_reached"])
        lines.append(
            f"| {r['kind']} | {r['num_kv_pairs']} | {r['seq_len']} | {r['batch_size']} "
            f"| {r['lr']:g} | {r['seed']} "
            f"| {r['steps']} | {recall} | {target} | {reached} | {r['seconds']:.0f} "
            f"| {r['date']} |"
        )
    with open(os.path.join(out, "mqar_recall.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _floats(text):
    return [float(x) for x in text.split(",") if x]


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="attention,gdn", help="comma-separated block kinds")
    parser.add_argument("--learning_rates", type=_floats, default=[], help="default: shipped")
    parser.add_argument("--seeds", type=_ints, default=[0])
    parser.add_argument("--num_kv_pairs", type=int, default=0, help="0: the shipped config's")
    parser.add_argument("--seq_len", type=int, default=0, help="0: the shipped config's")
    parser.add_argument("--batch_size", type=int, default=0, help="0: the shipped config's")
    parser.add_argument("--steps_multiplier", type=int, default=2)
    parser.add_argument("--num_steps", type=int, default=0, help="0: shipped (x multiplier)")
    parser.add_argument("--evals_per_run", type=int, default=12)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cores", type=_ints, default=[], help="CPU cores to pin runs to")
    parser.add_argument("--cores_per_run", type=int, default=1, help=">1: XLA's own threads")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument(
        "--keep_workdirs",
        default="",
        help="keep each run's workdir (checkpoint, metrics, events) under this folder, so "
        "its model can be evaluated further (python -m evals.recall --workdir=...)",
    )
    args = parser.parse_args(argv)
    args.kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = sorted(set(args.kinds) - set(models.registered_blocks()))
    if unknown:
        parser.error(f"--kinds: unknown block kinds {unknown}")

    cores = queue.Queue()
    available = args.cores or sorted(os.sched_getaffinity(0))
    size = args.cores_per_run
    if size < 1 or size > len(available):
        parser.error(f"--cores_per_run {size}: between 1 and the {len(available)} cores given")
    groups = [tuple(available[i : i + size]) for i in range(0, len(available) - size + 1, size)]
    args.workers = min(args.workers, len(groups))
    for group in groups[: args.workers]:
        cores.put(group)
    jobs = jobs_for(args)
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_one, job, cores, args.keep_workdirs) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            # Re-read before writing: another sweep on other cores may have added rows.
            rows = {_key(r): r for r in load(os.path.join(args.out, "mqar_recall.json"))}
            rows[_key(row)] = row
            write(list(rows.values()), args.out)
            recall = "failed" if row["returncode"] else f"{row['recall']:.3f}"
            print(f"{row['kind']} lr={row['lr']:g} seed={row['seed']} pairs="
                  f"{row['num_kv_pairs']}: recall {recall} (reached at {row['step_reached']}, "
                  f"{row['seconds']:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
