"""The train step: gradient accumulation is exact, non-finite updates never land."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim
from tests.training.test_sharding import tiny_config
from training import sharding as sharding_lib
from training.state import create_train_state, model_spec
from training.step import make_train_step

# Accumulating 2 micro-batches sums the same per-token terms in another order.
RTOL, ATOL = 1e-5, 1e-7


def setup(config, tx=None):
    spec = model_spec(config.model, config.seed)
    schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
    if tx is None:
        tx = optim.build(config.optim, spec.abstract_params, spec.logical_specs, num_steps=10)
    config.mesh.data, config.mesh.fsdp = 1, 1
    mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
    state, _ = create_train_state(config, spec, tx, mesh)
    return spec, tx, schedule, state


def make_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.model.vocab_size, (config.train.batch_size, 33))
    mask = (rng.random((config.train.batch_size, 32)) < 0.7).astype(np.float32)
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "mask": jnp.asarray(mask),
    }


def test_gradient_accumulation_equals_one_big_batch():
    config = tiny_config()
    # Plain SGD with lr 1 so the parameter change *is* the gradient. (Adam's first step is
    # about sign(g), which turns float rounding of near-zero gradients into O(lr) changes.)
    spec, tx, schedule, state = setup(config, tx=optax.sgd(1.0))
    batch = make_batch(config)
    results = []
    for accum in (1, 4):
        config.train.grad_accum_steps = accum
        step = jax.jit(make_train_step(spec, tx, schedule, config.train))
        results.append(step(state, batch))
    (one, metrics_one), (four, metrics_four) = results
    for key in ("loss", "ce_loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(metrics_four[key], metrics_one[key], rtol=RTOL, atol=ATOL)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
        four.params,
        one.params,
    )


def test_nonfinite_update_leaves_state_untouched():
    config = tiny_config()
    config.train.inject_nonfinite_at_step = 1
    spec, tx, schedule, state = setup(config)
    step = jax.jit(make_train_step(spec, tx, schedule, config.train))
    state, metrics = step(state, make_batch(config, seed=0))
    assert bool(metrics["finite"])
    skipped, metrics = step(state, make_batch(config, seed=1))
    assert not bool(metrics["finite"])
    assert int(skipped.step) == 2 and int(skipped.nonfinite_steps) == 1
    jax.tree.map(np.testing.assert_array_equal, skipped.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, skipped.opt_state, state.opt_state)
    # The next step is finite again and updates every parameter.
    after, metrics = step(skipped, make_batch(config, seed=2))
    assert bool(metrics["finite"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), after.params, state.params)
    assert all(jax.tree.leaves(changed))


def test_slimadam_snr_calibration_feeds_the_optimizer():
    import pytest

    from errors import ConfigError
    from training import calibration

    config = tiny_config()
    config.optim.name, config.optim.slimadam.rules = "slimadam", "snr"
    config.optim.slimadam.calibration_steps = 3
    spec = model_spec(config.model, config.seed)
    with pytest.raises(ConfigError, match="optim.slimadam: rules='snr' needs measured axes"):
        optim.build(config.optim, spec.abstract_params, spec.logical_specs, num_steps=10)
    config.mesh.data, config.mesh.fsdp = 1, 1
    mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
    axes = calibration.slimadam_axes(config, spec, mesh)
    paths = optim.routing.path_to_str
    leaves = jax.tree_util.tree_flatten_with_path(spec.abstract_params)[0]
    assert set(axes) == {paths(path) for path, _ in leaves}
    assert any(choice is not None for choice in axes.values())
    tx = optim.build(
        config.optim, spec.abstract_params, spec.logical_specs, num_steps=10, slimadam_axes=axes
    )
    state = jax.eval_shape(tx.init, spec.abstract_params)
    assert optim.state_bytes(state) < 2 * sum(
        x.size * 4 for x in jax.tree.leaves(spec.abstract_params)
    )
