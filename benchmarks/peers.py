"""Ours against the peers, side by side on CPU: forward + backward wall time.

    python -m benchmarks.peers --jla_python=/tmp/peer-jla/bin/python \\
        --titans_python=/tmp/peer-titans/bin/python [--threads=pinned|all] [--rounds=5]

Comparisons (float32, the step is the gradient of sum(output) w.r.t. every input, and for
the layers every parameter too):

* "gdn": the chunked Gated DeltaNet op, ours (`pallas_kernels.linear_memory.recurrence(
  "gated_deltanet", ..., impl="chunked")`) against jax-linear-attention's
  (`jla.ops.linear_attention("gated_deltanet", ..., impl="chunked")`), chunk 64, on the
  same q, k (l2-normalised), v, beta = sigmoid(.), g = log sigmoid(.) <= 0. Both take the
  flash-linear-attention layout and convention ([B, T, H, D], g a log decay, scale
  Dk ** -0.5), so the inputs go in unchanged; the first shape's outputs and dq are
  compared once (max relative error, in the results).
* "titans": the Titans neural-memory layer, ours (`layers.neural_memory.NeuralMemory`, MLP
  memory depth 2, expansion 2, momentum, chunks of 16 and 64) against titans-pytorch's
  `NeuralMemory` (same width, heads, memory MLP, chunk 64). Not the same computation
  (titans-pytorch takes lr / momentum / decay per chunk, ours per token, and the
  projections differ): wall time only.

Nothing is installed here (see benchmarks/peers_envs.md for the peers' environments).
Each side of each shape runs in its own worker process (`--worker`, this file run by the
side's interpreter: ours under --ours_python (default: this one, e.g. .venv-py3.12's for the
newest jax), a peer under the interpreter given), which
builds the inputs from a fixed numpy seed, compiles (jit, or for torch one eager warm-up
step; not timed) and then answers "time N" lines on stdin with a JSON line of N timings,
each answer after one untimed step (so a side is timed warm, whatever ran before it).
Rounds interleave: round r times ours then the peer for every shape, and the median over
rounds is reported. A peer whose interpreter is missing or whose import fails gives a
"not importable" row; the rest still runs.

--threads=pinned runs every worker under `taskset -c 0` with XLA's CPU thread pools at one
thread (jax) or torch.set_num_threads(1) (torch); --threads=all leaves every core to it.
Writes benchmarks/results/peers_cpu.md and .json (--out to change the folder; a second
mode is merged into the same file). Part of `make bench`, not of the tests.

This module imports only the standard library and numpy at the top, so a peer's
interpreter can run its worker; none of a peer's code is copied here.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

RESULTS = pathlib.Path(__file__).parent / "results"
REPO = pathlib.Path(__file__).resolve().parent.parent
PINNED_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
NOT_IMPORTABLE = "not importable"

# (B, T, H, D) of the Gated DeltaNet comparison; (B, T) of the Titans one.
GDN_SHAPES = ((2, 2048, 4, 64), (1, 8192, 4, 64))
TITANS_SHAPES = ((2, 1024), (2, 2048), (2, 4096))
GDN_CHUNK = 64
TITANS_DIM, TITANS_HEADS, TITANS_HEAD_DIM = 256, 4, 64
TITANS_PEER_CHUNK = 64
TITANS_OUR_CHUNKS = (16, 64)


# ---------------------------------------------------------------------------------------
# Inputs (numpy, so both sides of a comparison get the same numbers whatever their library)


def gdn_inputs(batch, length, heads, dim, seed=0):
    """q, k (l2-normalised over D), v: [B, T, H, D]; g (log decay <= 0), beta: [B, T, H]."""
    rng = np.random.default_rng(seed)
    shape = (batch, length, heads, dim)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    gates = shape[:3]
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal(gates, dtype=np.float32)))
    # log sigmoid(z + 3): decays of about 0.95 per token (g ~ -0.05), never above 0.
    g = -np.log1p(np.exp(-(rng.standard_normal(gates, dtype=np.float32) + 3.0)))
    return tuple(x.astype(np.float32) for x in (q, k, v, g, beta))


def titans_inputs(batch, length, dim, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, length, dim), dtype=np.float32)


# ---------------------------------------------------------------------------------------
# Workers: build (step, check) for one side; step() runs one forward + backward to the end.


def _jax_timer(fn, args):
    import jax

    step = jax.jit(jax.grad(fn, argnums=tuple(range(len(args)))))
    args = [jax.numpy.asarray(x) for x in args]

    def run():
        jax.block_until_ready(step(*args))

    return run, {"jax": jax.__version__, "backend": jax.default_backend()}


def _gdn_worker(side, shape, chunk, dump):
    import jax
    import jax.numpy as jnp

    if side == "ours":
        from pallas_kernels.linear_memory import recurrence

        def op(q, k, v, g, beta):
            o, _ = recurrence("gated_deltanet", q, k, v, g, beta, chunk_size=chunk, impl="chunked")
            return o
    else:
        from jla.ops import linear_attention

        def op(q, k, v, g, beta):
            o, _ = linear_attention(
                "gated_deltanet", q, k, v, g=g, beta=beta, chunk_size=chunk, impl="chunked"
            )
            return o

    inputs = gdn_inputs(*shape)
    run, versions = _jax_timer(lambda *a: jnp.sum(op(*a)), inputs)
    if side == "peer":
        from importlib.metadata import version

        versions["jax_linear_attention"] = version("jax-linear-attention")
    if dump:
        args = [jnp.asarray(x) for x in inputs]
        o = jax.jit(op)(*args)
        dq = jax.jit(jax.grad(lambda *a: jnp.sum(op(*a))))(*args)
        np.savez(dump, o=np.asarray(o), dq=np.asarray(dq))
    return run, versions


def _titans_worker(side, shape, chunk, dump, threads, dim, heads, head_dim):
    batch, length = shape
    x = titans_inputs(batch, length, dim)
    if side == "ours":
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from layers.neural_memory import NeuralMemory
        from pallas_kernels.neural_memory import MemorySpec

        layer = NeuralMemory(
            dim,
            num_heads=heads,
            head_dim=head_dim,
            spec=MemorySpec(architecture="mlp", depth=2, expansion=2, rule="momentum"),
            chunk_size=chunk,
            impl="chunked",
            rngs=nnx.Rngs(0),
        )

        def loss(module, inputs):
            return jnp.sum(module(inputs)[0])

        step = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
        xs = jnp.asarray(x)

        def run():
            jax.block_until_ready(step(layer, xs))

        return run, {"jax": jax.__version__, "backend": jax.default_backend()}

    import titans_pytorch
    import torch
    from titans_pytorch import NeuralMemory as PeerMemory

    if threads == "pinned":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    memory = PeerMemory(
        dim,
        chunk_size=chunk,
        dim_head=head_dim,
        heads=heads,
        default_model_kwargs={"depth": 2, "expansion_factor": 2.0},
    )
    xt = torch.from_numpy(x).requires_grad_(True)

    def run():
        for p in memory.parameters():
            p.grad = None
        xt.grad = None
        out, _ = memory(xt)
        out.sum().backward()

    version = getattr(titans_pytorch, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("titans-pytorch")
    versions = {
        "torch": torch.__version__,
        "titans_pytorch": version,
        "torch_threads": torch.get_num_threads(),
    }
    return run, versions


def worker(args):
    """Print {"status": "ready", ...} once built and compiled (or {"status": "not
    importable"}), then one {"times": [...]} line per "time N" line read from stdin."""
    shape = tuple(int(s) for s in args.shape.split("x"))
    try:
        if args.comparison == "gdn":
            run, versions = _gdn_worker(args.side, shape, args.chunk, args.dump)
        else:
            run, versions = _titans_worker(
                args.side,
                shape,
                args.chunk,
                args.dump,
                args.threads,
                args.dim,
                args.heads,
                args.head_dim,
            )
    except ImportError as error:
        print(json.dumps({"status": NOT_IMPORTABLE, "error": repr(error)}), flush=True)
        return
    start = time.perf_counter()
    run()  # compile (jax) / warm-up (torch), not timed
    compile_s = time.perf_counter() - start
    ready = {"status": "ready", "compile_s": compile_s, "python": platform.python_version()}
    print(json.dumps({**ready, "versions": versions}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "time":
            break
        # One untimed step first: the side timed next would otherwise pay for whatever ran
        # before it (another worker's shape evicting its caches): ours at B1 T1024 took
        # 65 ms right after jla's T16384 step and 27 ms after a step of its own.
        run()
        times = []
        for _ in range(int(words[1]) if len(words) > 1 else 1):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times}), flush=True)


# ---------------------------------------------------------------------------------------
# Orchestrator


class Worker:
    """One side of one shape in its own process; None-like (`.error`) when it cannot run."""

    def __init__(self, python, argv, threads):
        self.error, self.ready, self.times, self.proc = None, None, [], None
        if python is None or not (pathlib.Path(python).exists() or shutil.which(python)):
            self.error = f"{NOT_IMPORTABLE} (no interpreter at {python})"
            return
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        if "--side=ours" in argv:  # ours: the project's package, from the repository root
            command = [python, "-m", "benchmarks.peers", "--worker", *argv]
        else:  # a peer: this file alone (-P: its folder is not put on sys.path)
            env.pop("PYTHONPATH", None)
            command = [python, "-P", str(pathlib.Path(__file__).resolve()), "--worker", *argv]
        if threads == "pinned":
            env["XLA_FLAGS"] = PINNED_XLA_FLAGS
            if shutil.which("taskset"):
                command = ["taskset", "-c", "0", *command]
        # stderr to a file, not a pipe nobody reads (a chatty worker would fill it and block).
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        line = self.proc.stdout.readline()
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            self.proc.stdin.close()
            self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read()[-2000:]
            errors = [t for t in tail.splitlines() if "Error" in t] or tail.splitlines()[-1:]
            self.error = f"worker failed: {errors[-1] if errors else line!r}"
            self.proc = None
            return
        if message["status"] != "ready":
            self.error = f"{NOT_IMPORTABLE} ({message.get('error', '')})"
            self.close()
            return
        self.ready = message

    def time(self, repeats):
        if self.proc is None:
            return
        self.proc.stdin.write(f"time {repeats}\n")
        self.proc.stdin.flush()
        self.times.extend(json.loads(self.proc.stdout.readline())["times"])

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None

    def summary(self):
        if self.error is not None:
            return {"status": self.error}
        return {
            **self.ready,
            "status": "ok",
            "median_s": statistics.median(self.times) if self.times else None,
            "min_s": min(self.times) if self.times else None,
            "times": self.times,
        }


def _shape_text(comparison, shape):
    if comparison == "gdn":
        return "B{} T{} H{} D{}".format(*shape)
    return "B{} T{}".format(*shape)


def plan(args):
    """Rows: (comparison, shape, [(label, python, argv)]); the first entry is the peer."""
    rows = []
    common = ["--threads", args.threads]
    for shape in args.gdn_shapes if "gdn" in args.comparisons else ():
        argv = ["--comparison=gdn", f"--shape={'x'.join(map(str, shape))}", f"--chunk={GDN_CHUNK}"]
        rows.append(
            (
                "gdn",
                shape,
                [
                    ("jax-linear-attention", args.jla_python, argv + common),
                    ("ours", args.ours_python, argv + common),
                ],
            )
        )
    width = [f"--dim={args.dim}", f"--heads={args.heads}", f"--head_dim={args.head_dim}"]
    for shape in args.titans_shapes if "titans" in args.comparisons else ():
        argv = ["--comparison=titans", f"--shape={'x'.join(map(str, shape))}", *width, *common]
        sides = [("titans-pytorch", args.titans_python, argv + [f"--chunk={TITANS_PEER_CHUNK}"])]
        for chunk in args.titans_chunks:
            sides.append((f"ours chunk {chunk}", args.ours_python, argv + [f"--chunk={chunk}"]))
        rows.append(("titans", shape, sides))
    return rows


def agreement(args, tmp):
    """Max relative error (max |ours - peer| / max |peer|) of o and dq at the first shape."""
    if "gdn" not in args.comparisons or not args.gdn_shapes:
        return None
    shape = "x".join(map(str, args.gdn_shapes[0]))
    files = {}
    for side, python in (("ours", args.ours_python), ("peer", args.jla_python)):
        files[side] = tmp / f"gdn_{side}.npz"
        argv = [
            "--comparison=gdn",
            f"--shape={shape}",
            f"--chunk={GDN_CHUNK}",
            f"--side={side}",
            f"--dump={files[side]}",
        ]
        worker_ = Worker(python, argv, args.threads)
        worker_.close()
        if worker_.error is not None:
            return {"shape": shape, "status": worker_.error}
    ours, peer = np.load(files["ours"]), np.load(files["peer"])
    errors = {
        name: float(np.max(np.abs(ours[name] - peer[name])) / np.max(np.abs(peer[name])))
        for name in ("o", "dq")
    }
    return {"shape": shape, "status": "ok", "max_rel_error": errors}


def run_mode(args):
    rows = plan(args)
    workers = []
    for comparison, shape, sides in rows:
        built = []
        for label, python, argv in sides:
            side = "ours" if label.startswith("ours") else "peer"
            print(f"building {comparison} {_shape_text(comparison, shape)} {label}", flush=True)
            built.append((label, Worker(python, argv + [f"--side={side}"], args.threads)))
        workers.append(built)
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        for built in workers:
            # ours first, then the peer, every round
            for _, worker_ in built[1:] + built[:1]:
                worker_.time(args.repeats)
    results = []
    for (comparison, shape, _), built in zip(rows, workers):
        for _, worker_ in built:
            worker_.close()
        sides = {label: worker_.summary() for label, worker_ in built}
        results.append(
            {"comparison": comparison, "shape": _shape_text(comparison, shape), "sides": sides}
        )
    return results


def _other_jobs():
    try:
        out = subprocess.run(
            # Any benchmark counts too (a model comparison on the other core was once missed).
            ["pgrep", "-af", r"train.py|pytest|-m benchmarks\."],
            capture_output=True,
            text=True,
        ).stdout
    except FileNotFoundError:
        return []
    return [line for line in out.splitlines() if "benchmarks.peers" not in line]


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else "-"


def table_lines(results):
    lines = [
        "| comparison | shape | ours s | peer s | ours/peer |",
        "|---|---|---:|---:|---:|",
    ]
    for row in results:
        labels = list(row["sides"])
        peer_label, peer = labels[0], row["sides"][labels[0]]
        peer_s = peer.get("median_s") if peer["status"] == "ok" else None
        for label in labels[1:]:
            ours = row["sides"][label]
            ours_s = ours.get("median_s") if ours["status"] == "ok" else None
            name = f"{row['comparison']}: {label} vs {peer_label}"
            if peer["status"] != "ok":
                peer_text, ratio = peer["status"], "-"
            else:
                peer_text = _fmt(peer_s)
                ratio = f"{ours_s / peer_s:.2f}" if ours_s and peer_s else "-"
            ours_text = _fmt(ours_s) if ours["status"] == "ok" else ours["status"]
            lines.append(f"| {name} | {row['shape']} | {ours_text} | {peer_text} | {ratio} |")
    return lines


def _versions(results):
    """'side: python X, key value, ...' for each side (ours once)."""
    found = {}
    for row in results:
        for label, side in row["sides"].items():
            if "versions" not in side:
                continue
            who = "ours" if label.startswith("ours") else label
            items = {"python": side["python"], **side["versions"]}
            items.pop("backend", None)
            found[who] = ", ".join(f"{k} {v}" for k, v in items.items() if k != "torch_threads")
    return "; ".join(f"{who}: {text}" for who, text in found.items())


def markdown(report):
    lines = [
        "# Ours against the peers (CPU): forward + backward wall time",
        "",
        "Written by `benchmarks/peers.py` (see its docstring; the peers' environments are",
        "described in `benchmarks/peers_envs.md`). Median over interleaved rounds (round r",
        "times ours then the peer, each side in its own process), compile / warm-up excluded,",
        "float32, the step is the gradient of sum(output). ours/peer < 1: ours is faster.",
        "",
        "Gated DeltaNet: both sides take the same q, k (l2-normalised), v, beta = sigmoid,",
        "g = log sigmoid <= 0 unchanged (same layout [B, T, H, D], g a log decay, scale",
        "Dk^-0.5, chunk 64, impl chunked on both). Titans: NOT the same computation",
        "(titans-pytorch computes lr / momentum / decay per chunk, ours per token, and the",
        "projections, norms and memory MLP details differ; titans-pytorch runs eagerly, a",
        "warm-up step excluded): dim 256, 4 heads x 64, MLP memory depth 2 expansion 2,",
        "titans-pytorch at chunk 64, ours at chunk 16 (the shipped default) and 64; wall time",
        "only.",
        "",
    ]
    for mode, run in report["modes"].items():
        lines += [
            f"## threads={mode}",
            "",
            f"- date: {run['date']}",
            f"- Machine: {run['machine']}",
            f"- command: `{run['command']}`",
            f"- rounds: {run['rounds']} x {run['repeats']} timed step(s) per side and shape",
            f"- load average (1, 5, 15 min) at start: {run['load_start']}, at end: "
            f"{run['load_end']}",
            "- other heavy jobs (train.py, pytest, benchmarks) at start: "
            + ("; ".join(f"`{j}`" for j in run["other_jobs_start"]) or "none")
            + ", at end: "
            + ("; ".join(f"`{j}`" for j in run["other_jobs_end"]) or "none"),
            "- versions: " + _versions(run["results"]),
        ]
        check = run.get("agreement")
        if check:
            if check["status"] == "ok":
                errors = check["max_rel_error"]
                lines.append(
                    f"- Gated DeltaNet agreement at {check['shape']} (ours vs jla, max |diff| /"
                    f" max |jla|): o {errors['o']:.1e}, dq {errors['dq']:.1e}"
                )
            else:
                lines.append(f"- Gated DeltaNet agreement: {check['status']}")
        if run.get("note"):
            lines.append(f"- note: {run['note']}")
        lines += ["", *table_lines(run["results"]), ""]
    return "\n".join(lines)


def _parse_shapes(text):
    return tuple(tuple(int(s) for s in item.split("x")) for item in text.split(",") if item)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="internal: one side, one shape")
    parser.add_argument("--comparison", choices=("gdn", "titans"))
    parser.add_argument("--side", choices=("ours", "peer"), default="ours")
    parser.add_argument("--shape", help="worker: BxTxHxD (gdn) or BxT (titans)")
    parser.add_argument("--chunk", type=int, default=GDN_CHUNK)
    parser.add_argument("--dump", help="worker, gdn: save o and dq to this .npz")
    parser.add_argument("--jla_python", help="interpreter with jax-linear-attention")
    parser.add_argument("--titans_python", help="interpreter with titans-pytorch")
    parser.add_argument(
        "--ours_python", default=sys.executable, help="interpreter for our side (its jax)"
    )
    parser.add_argument("--threads", choices=("pinned", "all"), default="pinned")
    parser.add_argument("--comparisons", default="gdn,titans")
    parser.add_argument("--gdn_shapes", type=_parse_shapes, default=GDN_SHAPES)
    parser.add_argument("--titans_shapes", type=_parse_shapes, default=TITANS_SHAPES)
    parser.add_argument(
        "--titans_chunks",
        type=lambda s: tuple(int(c) for c in s.split(",")),
        default=TITANS_OUR_CHUNKS,
    )
    parser.add_argument("--dim", type=int, default=TITANS_DIM)
    parser.add_argument("--heads", type=int, default=TITANS_HEADS)
    parser.add_argument("--head_dim", type=int, default=TITANS_HEAD_DIM)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per round")
    parser.add_argument("--no_check", action="store_true", help="skip the agreement check")
    parser.add_argument("--note", default="", help="a line for the results file")
    parser.add_argument("--tag", default="", help="a name for this run's section (with --threads)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    args.comparisons = tuple(c for c in args.comparisons.split(",") if c)

    from benchmarks.layer_cost import machine_description  # ours only: a peer never runs main

    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / "peers_cpu.json", args.out / "peers_cpu.md"
    report = json.loads(json_path.read_text()) if json_path.exists() else {"modes": {}}
    run = {
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "machine": machine_description(),
        "command": " ".join(["python -m benchmarks.peers", *(argv or sys.argv[1:])]),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "load_start": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "other_jobs_start": _other_jobs(),
        "note": args.note,
    }
    if not args.no_check:
        tmp = args.out / ".peers_check"
        tmp.mkdir(exist_ok=True)
        run["agreement"] = agreement(args, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"agreement: {run['agreement']}", flush=True)
    run["results"] = run_mode(args)
    run["load_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    run["other_jobs_end"] = _other_jobs()
    report["modes"][f"{args.threads}, {args.tag}" if args.tag else args.threads] = run
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    print("\n".join(table_lines(run["results"])))
    return report


if __name__ == "__main__":
    main()
