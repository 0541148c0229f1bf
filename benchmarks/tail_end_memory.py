"""The tail-end associative-memory study of Wang et al. (2025, "Muon Outperforms Adam in
Tail-End Associative Memory Learning", arXiv 2509.26030, §5), at small scale, with every
optimizer of `optim/`.

    python -m benchmarks.tail_end_memory --steps=100          # about a minute on 2 cores

Setup (their §5: a one-layer linear associative memory trained from W_0 = 0). K classes;
class k has a key e_k and a value ē_k, the columns of E, Ē ∈ R^{d×K}. The memory
W ∈ R^{d×d} predicts softmax over the classes of Ē^T W e_k and is trained by
cross-entropy on batches in which class k appears with probability p_k ∝ k^-alpha
(heavy-tailed: their theorems use two frequency groups, their experiments a power law).
Embeddings are "orthonormal" (random orthonormal columns, their Assumption 5.1) or
"gaussian" (unit-norm Gaussian columns, which overlap).

Each optimizer runs at every learning rate of the sweep and is reported at the one with the
lowest final expected loss Σ_k p_k (-log p(k | e_k)). The curves are evaluated on every
class exactly: accuracy (the argmax is k) and the correct-class probability, averaged over
the head (the 10% most frequent classes) and the tail (the least frequent half), and the
worst class's probability. Adam is optax's (no weight decay, as the paper); SGD has
momentum 0.9; Muon and NorMuon run Newton-Schulz in float32 here (a 128² problem).
Results: `benchmarks/results/tail_end_memory.{json,md,png}`.
"""

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import layer_cost
from optim.apollo import apollo
from optim.muon import muon
from optim.normuon import normuon
from optim.slimadam import slimadam

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OPTIMIZERS = {
    "adam": lambda lr: optax.adam(lr),
    "sgd": lambda lr: optax.sgd(lr, momentum=0.9),
    "muon": lambda lr: muon(lr, ns_dtype="float32"),
    "normuon": lambda lr: normuon(lr, ns_dtype="float32"),
    "apollo": lambda lr: apollo(lr, rank=16, update_proj_gap=50),
    # The second moment shared along the key axis (SlimAdam's fan-in compression).
    "slimadam": lambda lr: slimadam(lr, reduce_axes={"W": (1,)}),
}
HEAD_FRACTION, TAIL_FRACTION = 0.1, 0.5


def class_probabilities(num_classes: int, alpha: float) -> np.ndarray:
    """p_k ∝ k^-alpha, k = 1..K (class 0 the most frequent)."""
    weights = np.arange(1, num_classes + 1, dtype=np.float64) ** -alpha
    return weights / weights.sum()


def embeddings(kind: str, dim: int, num_classes: int, seed: int):
    """(E, Ē), each [d, K] float32 with unit columns."""
    rng = np.random.default_rng(seed)

    def one():
        x = rng.standard_normal((dim, num_classes))
        if kind == "orthonormal":
            if num_classes > dim:
                raise ValueError(f"orthonormal embeddings need K <= d, got {num_classes} > {dim}")
            return np.linalg.qr(x)[0]
        if kind == "gaussian":
            return x / np.linalg.norm(x, axis=0, keepdims=True)
        raise ValueError(f"--embeddings: {kind!r} is not one of orthonormal, gaussian")

    return jnp.asarray(one(), jnp.float32), jnp.asarray(one(), jnp.float32)


def class_logits(weights, keys, values):
    """[K, K]: row k = the logits over classes for class k's key."""
    return (values.T @ weights @ keys).T


def per_class(weights, keys, values):
    """(correct-class probability [K], correct argmax [K] bool)."""
    logits = class_logits(weights, keys, values)
    probabilities = jax.nn.softmax(logits, axis=-1)
    correct = jnp.diagonal(probabilities)
    return correct, jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0])


def summary(weights, keys, values, p):
    """Head / tail accuracy and probability, the worst class's probability, expected loss."""
    correct, hits = per_class(weights, keys, values)
    num_classes = p.shape[0]
    head = slice(0, max(1, int(HEAD_FRACTION * num_classes)))
    tail = slice(int((1 - TAIL_FRACTION) * num_classes), num_classes)
    return {
        "head_accuracy": jnp.mean(hits[head]),
        "tail_accuracy": jnp.mean(hits[tail]),
        "head_probability": jnp.mean(correct[head]),
        "tail_probability": jnp.mean(correct[tail]),
        "worst_probability": jnp.min(correct),
        "expected_loss": -jnp.sum(p * jnp.log(correct)),
    }


def batch_loss(params, keys, values, labels):
    logits = class_logits(params["W"], keys[:, labels], values)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@functools.partial(jax.jit, static_argnames=("name", "steps", "batch_size", "every"))
def train(name, learning_rate, keys, values, p, seed, *, steps, batch_size, every):
    """W trained from 0 for `steps`; the summary every `every` steps
    ({metric: [steps // every]})."""
    dim = keys.shape[0]
    optimizer = OPTIMIZERS[name](learning_rate)
    params = {"W": jnp.zeros((dim, dim), jnp.float32)}
    state = optimizer.init(params)

    def step(carry, key):
        params, state = carry
        labels = jax.random.choice(key, p.shape[0], (batch_size,), p=p)
        grads = jax.grad(batch_loss)(params, keys, values, labels)
        updates, state = optimizer.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    def block(carry, block_keys):
        carry, _ = jax.lax.scan(step, carry, block_keys)
        return carry, summary(carry[0]["W"], keys, values, p)

    step_keys = jax.random.split(jax.random.key(seed), steps).reshape(steps // every, every)
    _, curves = jax.lax.scan(block, (params, state), step_keys)
    return curves


def run(args) -> dict:
    p = jnp.asarray(class_probabilities(args.classes, args.alpha), jnp.float32)
    keys, values = embeddings(args.embeddings, args.dim, args.classes, args.seed)
    every = max(1, args.steps // args.evals)
    steps = every * (args.steps // every)
    results = {}
    for name in args.optimizers:
        sweep = []
        for learning_rate in args.learning_rates:
            start = time.perf_counter()
            curves = train(name, learning_rate, keys, values, p, args.seed,
                           steps=steps, batch_size=args.batch_size, every=every)  # fmt: skip
            curves = {metric: np.asarray(values_).tolist() for metric, values_ in curves.items()}
            final_loss = curves["expected_loss"][-1]
            sweep.append(dict(learning_rate=learning_rate, curves=curves,
                              final_loss=final_loss if np.isfinite(final_loss) else None,
                              seconds=round(time.perf_counter() - start, 2)))  # fmt: skip
            print(f"{name} lr={learning_rate:g}: expected loss {final_loss:.4f}", file=sys.stderr)
        finite = [row for row in sweep if row["final_loss"] is not None]
        best = min(finite, key=lambda row: row["final_loss"]) if finite else None
        results[name] = dict(best_learning_rate=best and best["learning_rate"], sweep=sweep)
    return dict(steps=[every * (i + 1) for i in range(steps // every)], optimizers=results)


def markdown(header, results) -> str:
    lines = [
        "# Tail-end associative memory (Wang et al. 2025, §5) with every optimizer",
        "",
        f"{header['machine']}; jax {header['jax']}; {header['date']}",
        f"Command: `{header['command']}`",
        "",
        f"{header['settings']}. Each optimizer at the learning rate of the sweep with the "
        "lowest final expected loss; head = the 10% most frequent classes, tail = the least "
        "frequent half.",
        "",
        "| optimizer | lr | expected loss | head acc | tail acc | head p | tail p | worst p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results["optimizers"].items():
        best = [r for r in result["sweep"] if r["learning_rate"] == result["best_learning_rate"]]
        if not best:
            lines.append(f"| {name} | — | diverged at every lr | | | | | |")
            continue
        c = {metric: values[-1] for metric, values in best[0]["curves"].items()}
        lines.append(
            f"| {name} | {result['best_learning_rate']:g} | {c['expected_loss']:.3f} "
            f"| {c['head_accuracy']:.1%} | {c['tail_accuracy']:.1%} "
            f"| {c['head_probability']:.3f} | {c['tail_probability']:.3f} "
            f"| {c['worst_probability']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = ("head_probability", "tail_probability", "tail_accuracy")
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
    for name, result in results["optimizers"].items():
        best = [r for r in result["sweep"] if r["learning_rate"] == result["best_learning_rate"]]
        if not best:
            continue
        for axis, metric in zip(axes, panels):
            label = f"{name} (lr {result['best_learning_rate']:g})"
            axis.plot(results["steps"], best[0]["curves"][metric], label=label)
    for axis, metric in zip(axes, panels):
        axis.set_title(metric.replace("_", " "), fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floats(text):
    return [float(x) for x in text.split(",") if x]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tail_end_memory")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--classes", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=1.0, help="p_k ∝ k^-alpha")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--embeddings", default="orthonormal", help="orthonormal | gaussian")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--learning_rates", type=_floats,
                        default=[1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0])  # fmt: skip
    parser.add_argument("--evals", type=int, default=30, help="curve points per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    args.optimizers = [name for name in args.optimizers.split(",") if name]
    for name in args.optimizers:
        if name not in OPTIMIZERS:
            parser.error(f"--optimizers: {name!r} is not one of {', '.join(OPTIMIZERS)}")
    if args.steps < 1:
        parser.error(f"--steps: must be >= 1, got {args.steps}")
    results = run(args)
    header = layer_cost.run_header("benchmarks.tail_end_memory", argv)
    header["settings"] = (
        f"K = {args.classes} classes, d = {args.dim}, p_k ∝ k^-{args.alpha:g}, "
        f"{args.embeddings} embeddings, batch {args.batch_size}, {args.steps} steps, "
        f"W_0 = 0, seed {args.seed}"
    )
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "tail_end_memory")
    with open(stem + ".json", "w") as f:
        json.dump({**header, **results}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(header, results))
    plot(results, stem + ".png")
    print(markdown(header, results))
    return results


if __name__ == "__main__":
    main()
