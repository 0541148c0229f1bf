"""Shared pieces of the evals: scoring tokens and writing results; restoring a trained model
from a workdir (`models.restore`) and the one-line-error convention of the command-line
tools (`errors.run_cli`) are re-exported here.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Re-exported: the evals' command lines and callers use them as `common.<name>`.
from errors import ArgumentParser, run_cli  # noqa: F401
from models.restore import Restored, checkpoint_steps, load_config, restore  # noqa: F401

# Positions of the logits computed at once when scoring: [B, chunk, V] is the largest array,
# so a long sequence with a big vocabulary never materialises [B, T, V].
SCORE_CHUNK = 256


@nnx.jit
def _token_scores(model, inputs, targets, segment_ids):
    # Only packed rows pass segment_ids: a model without packing support need not take it.
    packed = {} if segment_ids is None else {"segment_ids": segment_ids}
    hidden, _ = model(inputs, **packed)
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


def token_scores(model, inputs, targets, *, batch_size: int = 32, segment_ids=None):
    """Per-token next-token loss (nats, float32) and argmax hit (bool), both [N, T] numpy.

    inputs, targets [N, T] int; segment_ids [N, T] int or None (packed documents, as the
    training windows carry them). Rows go through the model `batch_size` at a time (the
    last batch is padded with copies of its last row, then cut), in float32 logits.
    """
    arrays = [np.asarray(inputs, np.int32), np.asarray(targets, np.int32)]
    if segment_ids is not None:
        arrays.append(np.asarray(segment_ids, np.int32))
    losses, hits = [], []
    for start in range(0, len(arrays[0]), batch_size):
        batch = [x[start : start + batch_size] for x in arrays]
        count = len(batch[0])
        if count < batch_size:  # one compiled shape for every batch
            pad = [(0, batch_size - count), (0, 0)]
            batch = [np.pad(x, pad, mode="edge") for x in batch]
        batch_segments = batch[2] if segment_ids is not None else None
        loss, hit = jax.device_get(_token_scores(model, batch[0], batch[1], batch_segments))
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


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def float_list(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]
