"""FSDP: every optimizer's update on weights sharded over 'fsdp' equals the unsharded one.

Newton-Schulz, APOLLO's projections and SlimAdam's means must see whole matrices. Under
`jax.jit` with sharded inputs XLA inserts the collectives (Auto mesh axes); with Explicit
axes the optimizers gather what they need themselves. This test checks the numbers, on both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optim

# Sharded matmuls and reductions sum in a different order: float32 rounding only.
RTOL, ATOL = 1e-5, 1e-6


def _params_and_axes():
    """A few leaves covering each route: vocab table, 2-D kernel, per-head stack, norm."""
    shapes_and_axes = {
        "embedding": ((32, 16), P("vocab", "embed")),
        "q_kernel": ((16, 24), P("embed", "q_heads")),
        "memory_w1": ((2, 8, 4), P("heads", "kv", "mlp")),
        "norm_scale": ((16,), P("embed")),
    }
    keys = jax.random.split(jax.random.key(0), len(shapes_and_axes))
    params = {
        name: 0.5 * jax.random.normal(key, shape)
        for key, (name, (shape, _)) in zip(keys, shapes_and_axes.items())
    }
    return params, {name: spec for name, (_, spec) in shapes_and_axes.items()}


# FSDP specs: split the first axis the size-4 'fsdp' mesh axis divides (the rows of q and
# the dk axis of the per-head stack, i.e. inside the matrices Newton-Schulz works on).
FSDP_SPECS = {
    "embedding": P("fsdp"),
    "q_kernel": P("fsdp"),
    "memory_w1": P(None, "fsdp"),
    "norm_scale": P("fsdp"),
}


def _run(tx, params, steps=2):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(steps):
        grads = jax.tree.map(lambda p, s=step: jnp.sin(3.0 * p + s), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", [n for n in optim.OPTIMIZER_NAMES if n != "adamw"])
def test_sharded_update_equals_unsharded(name):
    assert len(jax.devices()) == 8, "tests/conftest.py provides 8 fake CPU devices"
    params, axes = _params_and_axes()
    config = optim.default_config()
    config.name, config.warmup_steps = name, 0
    config.muon.ns_dtype = config.normuon.ns_dtype = "float32"
    config.apollo.rank, config.apollo.update_proj_gap = 4, 1
    tx = optim.build(config, params, axes, num_steps=10)
    expected = _run(tx, params)

    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2)
        shardings = {k: NamedSharding(mesh, spec) for k, spec in FSDP_SPECS.items()}
        got = _run(tx, jax.device_put(params, shardings))
        for key in params:
            np.testing.assert_allclose(
                np.asarray(got[key]), np.asarray(expected[key]), RTOL, ATOL, err_msg=key
            )
