"""Shared pieces of the evals: restoring a trained model from a workdir, scoring tokens,
writing results, and the one-line-error convention of the command-line tools.
"""

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from errors import CheckpointError, MnemaxError
from models.registry import build_model

# Positions of the logits computed at once when scoring: [B, chunk, V] is the largest array,
# so a long sequence with a big vocabulary never materialises [B, T, V].
SCORE_CHUNK = 256


@dataclasses.dataclass
class Restored:
    """A trained model, the run's resolved config and the step of its checkpoint."""

    model: nnx.Module
    config: ml_collections.ConfigDict
    step: int


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved as WORKDIR/config.json (CheckpointError if absent)."""
    if not os.path.isdir(workdir):
        raise CheckpointError(f"{workdir}: workdir does not exist")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no config.json (not a workdir written by train.py)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints under WORKDIR/checkpoints, newest first (Orbax
    names in-progress saves `<step>.orbax-checkpoint-tmp-*`, which are not numbers)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    return sorted(steps, reverse=True)


def restore(workdir: str, step: int | None = None) -> Restored:
    """The model of WORKDIR at checkpoint `step` (None: the newest one that can be read).

    Only the parameters are read (no optimizer state, no mesh): the model is rebuilt from
    config.json on the default device, whatever mesh trained it.
    """
    import orbax.checkpoint as ocp

    config = load_config(workdir)
    steps = checkpoint_steps(workdir)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{workdir}/checkpoints: no checkpoint of step {step}")
        steps = [step]
    if not steps:
        raise CheckpointError(f"{workdir}/checkpoints: no checkpoint to evaluate")
    abstract = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(config.seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params)
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
    args = ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
    )
    errors = []
    for candidate in steps:
        path = os.path.join(workdir, "checkpoints", str(candidate), "state")
        try:
            # A partial restore: the train state's "params" entry only, on one device.
            with ocp.PyTreeCheckpointer() as checkpointer:
                saved = checkpointer.restore(path, args=args)
        except Exception as error:  # noqa: BLE001 - any failure means "try an older one"
            errors.append(f"{candidate}: {str(error).splitlines()[0][:120]}")
            continue
        nnx.replace_by_pure_dict(params, saved["params"])
        model = nnx.merge(graphdef, params, rest)
        return Restored(model, config, candidate)
    raise CheckpointError(f"{workdir}/checkpoints: no readable checkpoint ({'; '.join(errors)})")


@nnx.jit
def _token_scores(model, inputs, targets):
    hidden, _ = model(inputs)
    kernel = model.output_kernel().astype(jnp.float32)
    losses, hits = [], []
    for start in range(0, inputs.shape[1], SCORE_CHUNK):
        stop = start + SCORE_CHUNK
        logits = jnp.einsum("btd,dv->btv", hidden[:, start:stop].astype(jnp.float32), kernel)
        target = targets[:, start:stop, None]
        target_logit = jnp.take_along_axis(logits, target, axis=-1)[..., 0]
        losses.append(jax.nn.logsumexp(logits, axis=-1) - target_logit)
        hits.append(jnp.argmax(logits, axis=-1) == targets[:, start:stop])
    return jnp.concatenate(losses, axis=1), jnp.concatenate(hits, axis=1)


def token_scores(model, inputs, targets, *, batch_size: int = 32):
    """Per-token next-token loss (nats, float32) and argmax hit (bool), both [N, T] numpy.

    inputs, targets [N, T] int. Rows go through the model `batch_size` at a time (the last
    batch is padded with copies of its first row, then cut), in float32 logits.
    """
    inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
    losses, hits = [], []
    for start in range(0, len(inputs), batch_size):
        rows = slice(start, start + batch_size)
        batch_inputs, batch_targets = inputs[rows], targets[rows]
        count = len(batch_inputs)
        if count < batch_size:  # one compiled shape for every batch
            pad = [(0, batch_size - count), (0, 0)]
            batch_inputs = np.pad(batch_inputs, pad, mode="edge")
            batch_targets = np.pad(batch_targets, pad, mode="edge")
        loss, hit = jax.device_get(_token_scores(model, batch_inputs, batch_targets))
        losses.append(loss[:count])
        hits.append(hit[:count])
    return np.concatenate(losses), np.concatenate(hits)


def write_results(workdir: str, name: str, results: dict) -> str:
    """Writes WORKDIR/evals/<name>_step<step>.json (atomically); returns its path."""
    directory = os.path.join(workdir, "evals")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}_step{results['step']}.json")
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(temporary, path)
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of `rows` (dicts) in `columns` order; floats with 4 digits."""

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    body = [[cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `error: ...` and exit code 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def float_list(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; a MnemaxError becomes one line `error: ...` and its exit code."""
    try:
        main(argv)
    except MnemaxError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    return 0
