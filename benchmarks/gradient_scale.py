"""Gradient norms of the first training steps of a model comparison text run, per parameter.

    python -m benchmarks.gradient_scale --kind mal --seed 1 --steps 12 [--set model.mal.rule=gd]

Builds `benchmarks.model_comparison`'s text config of `--kind` (matched to the Transformer's
parameter count), trains `--steps` steps as `train.py` does, and before each step takes the
gradient of the batch once more to print the global norm and the `--top` largest parameter
leaves. The logged `grad_norm` of a run is one step in `log.every_steps`; this shows every
step and where the gradient sits, e.g. the deep memories' write path at initialisation
(`benchmarks/results/gradient_scale.md`). `--set key=value` overrides a config entry (the
value read as JSON, else as a string). `--breakdown` splits the first batch's gradient at
initialisation by row and sets it beside a batch of random bytes of the same shape.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import data as data_lib
import optim
from benchmarks import model_comparison
from training import sharding as sharding_lib
from training.state import create_train_state, model_spec
from training.step import make_train_step, model_terms


def comparison_text_config(kind: str, seed: int, overrides=()):
    config = model_comparison.text_config(kind, 600)
    config = model_comparison.match_parameters(config, model_comparison.parameter_targets()["text"])
    for item in overrides:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = config
        for name in path:
            node = node[name]
        try:
            node[last] = json.loads(value)
        except json.JSONDecodeError:  # a bare string: --set model.mal.rule=gd
            node[last] = value
    config.seed = seed
    return model_comparison.resolved(config)


def _initial_state(config):
    """(spec, train state at initialisation, tx, training batch iterator) as `train.py`'s."""
    spec = model_spec(config.model, config.seed)
    tx = optim.build(
        config.optim, spec.abstract_params, spec.logical_specs, num_steps=config.train.num_steps
    )
    state, _ = create_train_state(config, spec, tx, sharding_lib.make_mesh(config.mesh))
    batches = data_lib.build_train_iterator(
        config.data,
        seed=config.seed,
        global_batch_size=config.train.batch_size,
        process_index=0,
        process_count=1,
    )
    return spec, state, tx, batches


def _gradient(spec):
    """params, batch -> the gradient of the batch's loss (the train step's, one micro-batch)."""

    def loss(params, batch):
        terms = model_terms(spec, params, batch)
        return terms["ce_sum"] / jnp.maximum(batch["mask"].sum(), 1.0) + terms["aux_loss"]

    return jax.grad(loss)


def gradient_scale(config, steps: int, top: int = 6) -> list[dict]:
    """Per step: {"step", "loss", "grad_norm", "largest": [(leaf path, norm), ...]}."""
    spec, state, tx, batches = _initial_state(config)
    schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
    train_step = jax.jit(make_train_step(spec, tx, schedule, config.train))
    gradient = _gradient(spec)
    leaf_norms = jax.jit(
        lambda params, batch: jax.tree.map(jnp.linalg.norm, gradient(params, batch))
    )

    rows = []
    for step in range(1, steps + 1):
        batch = next(batches)
        norms = jax.tree_util.tree_leaves_with_path(leaf_norms(state.params, batch))
        state, metrics = train_step(state, batch)
        largest = sorted(
            ((jax.tree_util.keystr(path), float(norm)) for path, norm in norms),
            key=lambda item: -item[1],
        )[:top]
        rows.append(
            {
                "step": step,
                "loss": float(metrics["loss"]),
                "grad_norm": float(metrics["grad_norm"]),
                "largest": largest,
            }
        )
    return rows


def first_batch_breakdown(config, seed: int = 0) -> dict:
    """The gradient norm at initialisation of the first training batch, of each of its rows
    alone, and of a batch of uniformly random bytes of the same shape; with the bytes of the
    row with the largest norm."""
    spec, state, _, batches = _initial_state(config)
    batch = next(batches)
    gradient = _gradient(spec)
    norm = jax.jit(lambda params, batch: optax.global_norm(gradient(params, batch)))

    inputs = np.asarray(batch["inputs"])
    random = np.random.default_rng(seed).integers(0, 256, size=inputs.shape)
    random_batch = dict(batch, inputs=jnp.asarray(random, inputs.dtype))
    random_batch["targets"] = jnp.asarray(np.roll(random, -1, axis=1), inputs.dtype)
    per_row = [
        float(norm(state.params, jax.tree.map(lambda x, i=i: x[i : i + 1], batch)))
        for i in range(inputs.shape[0])
    ]
    worst = int(np.argmax(per_row))
    return {
        "batch": float(norm(state.params, batch)),
        "random_bytes": float(norm(state.params, random_batch)),
        "per_row": per_row,
        "largest_row": bytes(inputs[worst].astype(np.uint8).tolist()).decode("latin-1"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="mal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], help="config key=value")
    parser.add_argument("--breakdown", action="store_true", help="the first batch by row")
    args = parser.parse_args(argv)
    config = comparison_text_config(args.kind, args.seed, args.set)
    if args.breakdown:
        result = first_batch_breakdown(config)
        print(f"first batch {result['batch']:.1f}, random bytes {result['random_bytes']:.1f}")
        print("per row", " ".join(f"{norm:.0f}" for norm in result["per_row"]))
        print(f"largest row: {result['largest_row']!r}")
        return result
    rows = gradient_scale(config, args.steps, args.top)
    for row in rows:
        leaves = "; ".join(f"{path} {norm:.1f}" for path, norm in row["largest"])
        head = f"step {row['step']} loss {row['loss']:.3f} grad norm {row['grad_norm']:.1f}"
        print(f"{head} | {leaves}")
    return rows


if __name__ == "__main__":
    main()
