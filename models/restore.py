"""A trained model from its workdir: the resolved config train.py saved (config.json) and
the parameters of an Orbax checkpoint under checkpoints/<step>/state."""

import dataclasses
import json
import os

import jax
import ml_collections
from flax import nnx

from errors import CheckpointError
from models.registry import build_model


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

    workdir = os.path.abspath(workdir)  # Orbax refuses relative paths (`runs/default`)
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
