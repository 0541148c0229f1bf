"""Pure data parallel, FSDP and one device give the same loss and gradients (8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import base
from errors import ConfigError
from training import config_validation
from training import sharding as sharding_lib
from training.state import init_params, match_param_shardings, model_spec
from training.step import model_terms

# Cross-device reductions add in a different order than one device does: float32 sums of
# ~1e3 terms agree to a few ulps, so 1e-5 relative with a 1e-6 floor for near-zero grads.
RTOL, ATOL = 1e-5, 1e-6


def tiny_config():
    config = base.get_config()
    config.data.name = "mqar"
    config.data.seq_len = 32
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.num_layers = 2
    config.train.batch_size = 8
    return config_validation.validate(config, base.get_config())


def loss_and_grads(config, spec, params, batch, mesh=None):
    def loss_fn(params):
        terms = model_terms(spec, params, batch)
        return terms["ce_sum"] / terms["count"] + terms["aux_loss"]

    fn = jax.value_and_grad(loss_fn)
    if mesh is None:
        return jax.jit(fn)(params)
    shardings = sharding_lib.param_shardings(params, spec.logical_specs, mesh, config.mesh.rules)
    params = jax.device_put(params, shardings)
    batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
    return jax.jit(fn, out_shardings=(sharding_lib.replicated(mesh), shardings))(params)


def test_data_parallel_fsdp_and_one_device_agree():
    assert jax.device_count() == 8, "tests/conftest.py provides 8 CPU devices"
    config = tiny_config()
    spec = model_spec(config.model, config.seed)
    params = init_params(config.model, config.seed)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (8, 33))
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "mask": jnp.ones((8, 32), jnp.float32),
    }
    single = loss_and_grads(config, spec, params, batch)
    for data, fsdp in [(8, 1), (2, 4), (1, 8)]:
        config.mesh.data, config.mesh.fsdp = data, fsdp
        mesh = sharding_lib.make_mesh(config.mesh)
        loss, grads = loss_and_grads(config, spec, params, batch, mesh)
        np.testing.assert_allclose(loss, single[0], rtol=RTOL, atol=ATOL)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), grads, single[1]
        )
        if fsdp > 1:  # FSDP really shards: the embedding is split over the fsdp axis
            shardings = sharding_lib.param_shardings(
                params, spec.logical_specs, mesh, config.mesh.rules
            )
            specs = [s.spec for s in jax.tree.leaves(shardings)]
            assert any("fsdp" in spec for spec in specs)


@pytest.mark.parametrize(
    "data, fsdp, devices, expected",
    [(-1, 1, 8, (8, 1, 1)), (2, -1, 8, (2, 4, 1)), (1, 8, 8, (1, 8, 1)), (-1, 2, 4, (2, 2, 1))],
)
def test_mesh_shape_fills_minus_one(data, fsdp, devices, expected):
    config = base.get_config().mesh
    config.data, config.fsdp = data, fsdp
    assert sharding_lib.mesh_shape(config, devices) == expected


@pytest.mark.parametrize(
    "data, fsdp, message",
    [
        (4, 4, "needs 16 devices, only 8 available"),
        (-1, -1, "at most one"),
        (3, -1, "cannot fill 8 devices"),
        (0, 1, "mesh.data: must be a positive size"),
    ],
)
def test_bad_mesh_is_named(data, fsdp, message):
    config = base.get_config().mesh
    config.data, config.fsdp = data, fsdp
    with pytest.raises(ConfigError, match=message):
        sharding_lib.mesh_shape(config, 8)


def test_logical_rules_skip_indivisible_and_repeated_axes():
    config = base.get_config()
    config.mesh.data, config.mesh.fsdp = 2, 4
    mesh = sharding_lib.make_mesh(config.mesh)
    rules = {"embed": "fsdp", "mlp": "fsdp"}
    spec = sharding_lib.logical_to_mesh_spec(PartitionSpec("embed", "mlp"), rules, (8, 8), mesh)
    assert spec == PartitionSpec("fsdp", None)  # one mesh axis used once per parameter
    spec = sharding_lib.logical_to_mesh_spec(
        PartitionSpec(
            "embed",
        ),
        rules,
        (6,),
        mesh,
    )
    assert spec == PartitionSpec(None)  # 6 rows do not split over 4 devices


def test_optimizer_moments_follow_parameter_sharding():
    config = base.get_config()
    config.mesh.data, config.mesh.fsdp = 2, 4
    mesh = sharding_lib.make_mesh(config.mesh)
    params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
    param_sharding = {"w": jax.sharding.NamedSharding(mesh, PartitionSpec("fsdp"))}
    opt_like = ({"mu": {"w": params["w"]}, "count": jax.ShapeDtypeStruct((), jnp.int32)},)
    default = sharding_lib.replicated(mesh)
    chosen = match_param_shardings(opt_like, params, param_sharding, default)
    assert chosen[0]["mu"]["w"] == param_sharding["w"]
    assert chosen[0]["count"] == default
