"""optim.build / schedules / routing: AdamW equals plain Optax, and every leaf is routed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from errors import ConfigError
from optim import muon, routing
from tests.optim.trees import MATRIX_LEAVES, lm_params_and_axes


def _flat(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {routing.path_to_str(path): leaf for path, leaf in leaves}


def _grads(params, step):
    key = jax.random.fold_in(jax.random.key(1), step)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warmup_and_floor(schedule):
    config = optim.default_config()
    config.schedule = schedule
    config.warmup_steps = 10
    lr = optim.learning_rate_schedule(config, num_steps=50)
    peak, floor = config.learning_rate, config.learning_rate * config.min_learning_rate_ratio
    # Step s of the warmup uses peak * (s + 1) / warmup_steps: the first update is not wasted.
    np.testing.assert_allclose(lr(0), 0.1 * peak, rtol=1e-6)
    np.testing.assert_allclose(lr(4), 0.5 * peak, rtol=1e-6)
    np.testing.assert_allclose(lr(9), peak, rtol=1e-6)
    np.testing.assert_allclose(lr(10), peak, rtol=1e-6)
    np.testing.assert_allclose(lr(50), peak if schedule == "constant" else floor, rtol=1e-6)


def test_adamw_build_matches_plain_optax():
    config = optim.default_config()
    config.warmup_steps, config.grad_clip_norm = 3, 0.5
    params, axes = lm_params_and_axes()
    tx = optim.build(config, params, axes, num_steps=8)
    reference = optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.adamw(
            optim.learning_rate_schedule(config, 8),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=optim.weight_decay_mask(params, axes),
        ),
    )
    state, ref_state = tx.init(params), reference.init(params)
    got, want = params, params
    update, ref_update = jax.jit(tx.update), jax.jit(reference.update)
    for step in range(5):
        grads = _grads(params, step)
        updates, state = update(grads, state, got)
        got = optax.apply_updates(got, updates)
        ref_updates, ref_state = ref_update(grads, ref_state, want)
        want = optax.apply_updates(want, ref_updates)
    # Same ops in the same order: only compiler rounding may differ (float32).
    for path, leaf in _flat(got).items():
        np.testing.assert_allclose(leaf, _flat(want)[path], rtol=1e-6, atol=1e-7, err_msg=path)
    assert not np.allclose(_flat(got)["lm_head/kernel"], _flat(params)["lm_head/kernel"])


def test_routing_covers_every_leaf_once():
    params, axes = lm_params_and_axes()
    for name in optim.OPTIMIZER_NAMES:
        config = optim.default_config()
        config.name = name
        labels = _flat(optim.param_groups(config, params, axes))
        assert set(labels) == set(_flat(params)), name
        expected_matrix = set() if name == "adamw" else set(MATRIX_LEAVES)
        if name == "slimadam":  # an Adam variant: it keeps embedding and head (routing.py)
            expected_matrix |= {"embedding/embedding", "lm_head/kernel"}
        assert {p for p, label in labels.items() if label == name and name != "adamw"} == (
            expected_matrix
        )
        assert all(label in (name, "adamw") for label in labels.values())


def test_routing_patterns_and_stacks():
    params, axes = lm_params_and_axes()
    config = optim.default_config()
    config.name = "muon"
    config.adamw_patterns = ("attention/(query|key)/",)
    labels = _flat(optim.param_groups(config, params, axes))
    assert labels["blocks/0/attention/query/kernel"] == "adamw"
    assert labels["blocks/0/attention/value/kernel"] == "muon"
    # Without any pattern, the vocab axis still keeps embedding and head on AdamW, and the
    # `conv` axis the short convolution's taps.
    assert labels["embedding/embedding"] == labels["lm_head/kernel"] == "adamw"
    assert labels["blocks/1/memory/short_conv/kernel"] == "adamw"
    # Unannotated [16, 16] leaf: a matrix by shape. [heads] gate: a stack of scalars.
    assert labels["blocks/1/memory/feature_mix/kernel"] == "muon"
    assert labels["blocks/1/memory/gate"] == "adamw"
    decay = _flat(optim.weight_decay_mask(params, axes))
    assert not decay["blocks/0/mlp/up/bias"] and not decay["final_norm/scale"]
    assert not decay["blocks/1/memory/gate"] and decay["blocks/1/memory/w1/kernel"]
    assert decay["embedding/embedding"] and not decay["blocks/1/memory/lr_scalar"]


def test_bad_config_raises_config_error():
    params, axes = lm_params_and_axes()
    config = optim.default_config()
    config.name = "muon"
    config.adamw_patterns = ("(unclosed",)
    with pytest.raises(ConfigError, match="adamw_patterns"):
        optim.param_groups(config, params, axes)
    config = optim.default_config()
    config.name = "sgd"
    with pytest.raises(ConfigError, match="optim.name"):
        optim.build(config, params, axes, num_steps=10)


def test_state_bytes_counts_arrays_and_works_on_shapes():
    params, axes = lm_params_and_axes()
    config = optim.default_config()
    tx = optim.build(config, params, axes, num_steps=10)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state = tx.init(params)
    # AdamW: two float32 moments per parameter, plus int32 step counters of Adam and of
    # the learning-rate schedule.
    assert optim.state_bytes(state) == 2 * 4 * n_params + 2 * 4
    assert optim.state_bytes(jax.eval_shape(tx.init, params)) == optim.state_bytes(state)
    keys = {"key": jax.random.key(0), "raw": jnp.zeros((3,), jnp.uint32)}
    assert optim.state_bytes(keys) == 8 + 12


def test_mixed_build_routes_each_leaf_to_its_optimizer():
    """build(muon): matrices get Muon on the clipped gradients, the rest AdamW with its own
    learning rate and weight decay, both on the same schedule shape."""
    params, axes = lm_params_and_axes()
    config = optim.default_config()
    config.name, config.learning_rate, config.weight_decay = "muon", 0.02, 0.05
    config.adamw_learning_rate, config.adamw_weight_decay = 1e-3, 0.2
    config.warmup_steps, config.grad_clip_norm = 2, 0.5
    config.muon.ns_dtype = "float32"
    tx = optim.build(config, params, axes, num_steps=6)
    decay = optim.weight_decay_mask(params, axes)
    muon_alone = muon.muon(
        optim.learning_rate_schedule(config, 6), ns_dtype="float32", weight_decay=0.05
    )
    adamw_alone = optax.adamw(
        optim.learning_rate_schedule(config, 6, peak_learning_rate=1e-3),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=0.2,
        mask=decay,
    )
    matrices = lambda tree: {p: x for p, x in _flat(tree).items() if p in MATRIX_LEAVES}  # noqa: E731
    state, muon_state = tx.init(params), muon_alone.init(matrices(params))
    adamw_state = adamw_alone.init(params)
    got, expected_muon, expected_adamw = params, matrices(params), params
    for step in range(3):
        grads = _grads(params, step)
        updates, state = jax.jit(tx.update)(grads, state, got)
        got = optax.apply_updates(got, updates)
        # The global norm is taken over all gradients, before routing.
        clipped, _ = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
        muon_updates, muon_state = jax.jit(muon_alone.update)(
            matrices(clipped), muon_state, expected_muon
        )
        expected_muon = optax.apply_updates(expected_muon, muon_updates)
        adamw_updates, adamw_state = jax.jit(adamw_alone.update)(
            clipped, adamw_state, expected_adamw
        )
        expected_adamw = optax.apply_updates(expected_adamw, adamw_updates)
    flat_adamw = _flat(expected_adamw)
    for path, leaf in _flat(got).items():
        want = expected_muon[path] if path in MATRIX_LEAVES else flat_adamw[path]
        np.testing.assert_allclose(leaf, want, rtol=1e-5, atol=1e-6, err_msg=path)
    query = "blocks/0/attention/query/kernel"
    assert not np.allclose(expected_muon[query], flat_adamw[query])  # the routes differ


def test_bad_optimizer_section_raises_config_error():
    params, axes = lm_params_and_axes()
    config = optim.default_config()
    config.name, config.muon.scale = "muon", "spectral"
    with pytest.raises(ConfigError, match="optim.muon"):
        optim.build(config, params, axes, num_steps=10)
    config = optim.default_config()
    config.name, config.apollo.rank = "apollo", 0
    with pytest.raises(ConfigError, match="optim.apollo"):
        optim.build(config, params, axes, num_steps=10)
