"""The train state: parameters, optimizer state, step, RNG, built sharded from the start.

Parameters are kept as a plain nested dict of arrays (`nnx.to_pure_dict`), so Optax and
Orbax see ordinary pytrees; the model is rebuilt inside the step with `nnx.merge`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from models.registry import build_model
from training import sharding as sharding_lib


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: number of updates taken (skipped ones included)
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data, split per step for anything stochastic
    nonfinite_steps: jax.Array  # int32 scalar: updates skipped because of NaN/Inf


class ModelSpec(NamedTuple):
    """What the step needs to rebuild the model, and the parameters' layout."""

    graphdef: Any
    rest: Any  # non-parameter state (e.g. RNG streams), carried as a constant
    abstract_params: dict  # ShapeDtypeStructs
    logical_specs: dict  # PartitionSpecs of logical axis names


def model_spec(model_config, seed: int) -> ModelSpec:
    """Build the model abstractly (no allocation) to learn its structure and layout."""
    abstract_model = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(params))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params)
    )
    return ModelSpec(graphdef, rest, abstract, logical)


def init_params(model_config, seed: int) -> dict:
    model = build_model(model_config, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def match_param_shardings(tree, abstract_params, params_shardings, default: NamedSharding):
    """Shardings for an optimizer-state-like tree: a leaf whose path ends with a parameter's
    path and has that parameter's shape is laid out like the parameter (Adam moments,
    momentum); anything else (counts, factored moments, PRNG keys) is replicated."""
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_shardings = jax.tree.leaves(params_shardings)
    for (path, leaf), shard in zip(flat_params, flat_shardings):
        by_path[_path_key(path)] = (leaf.shape, shard)

    def choose(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == getattr(leaf, "shape", None):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(choose, tree)


def create_train_state(config, spec: ModelSpec, tx, mesh):
    """Initialise parameters and optimizer state directly in their sharded layout."""
    params_shardings = sharding_lib.param_shardings(
        spec.abstract_params, spec.logical_specs, mesh, config.mesh.rules
    )
    replicated = NamedSharding(mesh, PartitionSpec())

    def init():
        params = init_params(config.model, config.seed)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(config.seed + 1)),
            nonfinite_steps=jnp.zeros((), jnp.int32),
        )

    abstract_state = jax.eval_shape(init)
    state_shardings = TrainState(
        step=replicated,
        params=params_shardings,
        opt_state=match_param_shardings(
            abstract_state.opt_state, spec.abstract_params, params_shardings, replicated
        ),
        rng=replicated,
        nonfinite_steps=replicated,
    )
    state = jax.jit(init, out_shardings=state_shardings)()
    return state, state_shardings


def abstract_like(state, shardings):
    """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
