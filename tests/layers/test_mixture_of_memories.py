"""Mixture-of-Memories: routing, exact invariance of unrouted memories, load-balancing loss,
packing, decoding cache and a training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from errors import ConfigError
from layers.mixture_of_memories import MixtureOfMemories, load_balance_loss, route
from layers.short_conv import causal_depthwise_conv, subsequence_causal_conv
from models import registry
from pallas_kernels.linear_memory import gated_delta_rule

BATCH, LENGTH, WIDTH, HEADS, HEAD_DIM = 2, 10, 16, 2, 8
# float32 throughout: the same math along two routes (packed vs separate, cached vs full,
# with vs without the unrouted tokens) agrees to ~1e-6 at these sizes.
TOL = 1e-5


def _layer(rule="gated_deltanet", seed=0, **overrides):
    options = dict(num_memories=4, top_k=2, rule=rule, num_heads=HEADS, head_dim=HEAD_DIM)
    options.update(chunk_size=4, **overrides)
    return MixtureOfMemories(WIDTH, **options, rngs=nnx.Rngs(seed))


def _inputs(seed=0, length=LENGTH, batch=BATCH):
    return jax.random.normal(jax.random.key(seed), (batch, length, WIDTH), jnp.float32)


def _model_config(**overrides):
    config = models.default_config()
    config.vocab_size, config.d_model, config.num_heads, config.block_pattern = 32, 16, 2, ("mom",)
    config.mom.chunk_size = 4
    for key, value in overrides.items():
        config.mom[key] = value
    return config


def test_topk_weights_sum_to_one_over_the_chosen_memories():
    logits = jax.random.normal(jax.random.key(0), (3, 7, 5))
    probabilities, weights, chosen = route(logits, top_k=2)
    np.testing.assert_allclose(jnp.sum(probabilities, -1), 1.0, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, atol=1e-6)
    assert bool(jnp.all(jnp.sum(chosen, -1) == 2)) and bool(jnp.all((weights > 0) == chosen))
    top_two = jnp.argsort(-logits, axis=-1)[..., :2]
    expected = jnp.sum(jax.nn.one_hot(top_two, 5), axis=-2) > 0
    np.testing.assert_array_equal(chosen, expected)


def test_load_balance_loss_on_a_hand_checked_case():
    # Both tokens have p = (.1, .2, .3, .4): top-2 picks memories 2 and 3 with weights 3/7, 4/7.
    logits = jnp.log(jnp.array([[[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]]))
    probabilities, weights, chosen = route(logits, top_k=2)
    np.testing.assert_allclose(weights[0, 0], [0, 0, 3 / 7, 4 / 7], atol=1e-6)
    loss, load = load_balance_loss(probabilities, chosen, top_k=2)
    # f = (0, 0, 1/2, 1/2), P = (.1, .2, .3, .4): 4 * (.5 * .3 + .5 * .4) = 1.4.
    np.testing.assert_allclose(load, [0, 0, 0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(loss, 1.4, rtol=1e-6)
    uniform_loss, _ = load_balance_loss(jnp.full((1, 4, 4), 0.25), jnp.eye(4, dtype=bool)[None], 1)
    np.testing.assert_allclose(uniform_loss, 1.0, rtol=1e-6)  # perfectly balanced: 1


def test_layer_aux_has_the_loss_and_per_memory_loads():
    layer, x = _layer(aux_loss_coef=0.5), _inputs()
    y, aux = nnx.jit(lambda layer, x: layer(x))(layer, x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    probabilities, _, chosen = layer.route(x)
    loss, load = load_balance_loss(probabilities, chosen, top_k=2)
    np.testing.assert_allclose(aux["aux_loss/load_balance"], 0.5 * loss, rtol=1e-5)
    for m in range(4):
        np.testing.assert_allclose(aux[f"load/memory_{m}"], load[m], atol=1e-6)
    np.testing.assert_allclose(sum(aux[f"load/memory_{m}"] for m in range(4)), 1.0, atol=1e-6)


def test_every_parameter_is_annotated_and_memories_are_stacked():
    layer = _layer()
    params = nnx.state(layer, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    for path, param in nnx.to_flat_state(params):
        spec = specs[path].get_value()
        assert len(spec) == param.get_value().ndim and all(spec), (path, spec)
    assert layer.key_kernel[...].shape == (5, WIDTH, HEADS * HEAD_DIM)  # 4 routed + shared


def test_gated_delta_rule_with_zero_beta_and_decay_skips_a_token_exactly():
    keys = jax.random.split(jax.random.key(1), 5)
    shape = (1, 9, 2, 4)
    q, k, v = (jax.random.normal(key, shape) for key in keys[:3])
    g = -jax.nn.softplus(jax.random.normal(keys[3], shape[:3]))
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], shape[:3]))
    keep = jnp.array([True, False, True, True, False, False, True, False, True])
    masked = dict(
        g=jnp.where(keep[None, :, None], g, 0.0), beta=jnp.where(keep[None, :, None], beta, 0.0)
    )
    _, skipped = gated_delta_rule(q, k, v, **masked, output_final_state=True, impl="reference")
    _, removed = gated_delta_rule(
        q[:, keep], k[:, keep], v[:, keep], g[:, keep], beta[:, keep],
        output_final_state=True, impl="reference",
    )  # fmt: skip
    np.testing.assert_array_equal(skipped, removed)  # S_t = exp(0) S_{t-1} + 0: bit for bit


def test_subsequence_conv_ignores_unselected_tokens():
    x = _inputs(2, batch=1)
    kernel = jax.random.normal(jax.random.key(3), (4, WIDTH))
    state = jax.random.normal(jax.random.key(4), (1, 3, WIDTH))
    selected = jnp.array([[True, False, False, True, True, False, True, False, True, True]])
    y, new_state = subsequence_causal_conv(x, kernel, selected, conv_state=state)
    expected, expected_state = causal_depthwise_conv(x[:, selected[0]], kernel, conv_state=state)
    np.testing.assert_allclose(y[:, selected[0]], expected, atol=TOL)
    np.testing.assert_allclose(new_state, expected_state, atol=TOL)


@pytest.mark.parametrize("rule", ["gated_deltanet", "linear_attention"])
def test_unrouted_tokens_leave_a_memory_exactly_unchanged(rule):
    layer, x = _layer(rule), _inputs(5, length=12, batch=1)
    _, _, chosen = layer.route(x)
    counts = jnp.sum(chosen[0], axis=0)
    memory = int(jnp.argmax(jnp.where(counts < x.shape[1], counts, -1)))  # routed, not always
    keep = np.asarray(chosen[0, :, memory])
    assert 0 < keep.sum() < x.shape[1]
    extend = nnx.jit(lambda layer, x: layer.extend(x, layer.init_cache(1))[1])
    full, kept = extend(layer, x), extend(layer, x[:, keep])
    for name in ("state", "conv_key", "conv_value"):
        np.testing.assert_allclose(full[name][:, memory], kept[name][:, memory], atol=TOL)
    # The shared memory sees every token, so it does differ.
    assert float(jnp.max(jnp.abs(full["state"][:, -1] - kept["state"][:, -1]))) > 1e-3


def test_packed_batch_equals_segments_run_separately():
    layer, x = _layer(), _inputs(6, batch=1)
    forward = nnx.jit(lambda layer, x, segment_ids: layer(x, segment_ids=segment_ids)[0])
    packed = forward(layer, x, jnp.array([[1] * 5 + [2] * 5]))
    first, second = forward(layer, x[:, :5], None), forward(layer, x[:, 5:], None)
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=TOL)


def test_extend_equals_forward():
    """Full forward == extend token by token == extend of the first half then the rest."""
    block = registry.build_block("mom", _model_config(), layer_index=0, rngs=nnx.Rngs(0))
    x = _inputs(7, length=8)
    positions = jnp.broadcast_to(jnp.arange(8), x.shape[:2])
    full, _ = nnx.jit(lambda block, x: block(x, positions=positions))(block, x)
    extend = nnx.jit(lambda block, x, cache, p: block.extend(x, cache, positions=p))
    cache = block.init_cache(BATCH, 8)
    steps = []
    for t in range(8):
        y, cache = extend(block, x[:, t : t + 1], cache, positions[:, t : t + 1])
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=TOL)
    first, cache = extend(block, x[:, :4], block.init_cache(BATCH, 8), positions[:, :4])
    rest, _ = extend(block, x[:, 4:], cache, positions[:, 4:])
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, atol=TOL)


def test_tiny_lm_training_step_has_finite_gradients_and_the_aux_loss():
    model = models.build_model(_model_config(shared_memory=False), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(8), (2, 13), 0, 32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": jnp.ones((2, 12))}
    graphdef, params = nnx.split(model)

    def loss(params):
        terms = nnx.merge(graphdef, params).loss_terms(batch)
        return terms["ce_sum"] / terms["count"] + terms["aux_loss"], terms

    (value, terms), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert np.isfinite(float(value)) and "aux_loss/layer_01/load_balance" in terms
    np.testing.assert_allclose(
        terms["aux_loss"],
        terms["aux_loss/layer_00/load_balance"] + terms["aux_loss/layer_01/load_balance"],
        rtol=1e-6,
    )
    assert float(terms["aux_loss"]) > 0
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    router_grad = grads["blocks"][0]["mixer"]["router"]["kernel"]
    assert float(jnp.max(jnp.abs(router_grad))) > 0  # the router learns


def test_bad_options_name_their_key():
    with pytest.raises(ConfigError, match=r"model\.mom\.top_k"):
        models.build_model(_model_config(top_k=5), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.mom\.rule"):
        models.build_model(_model_config(rule="mamba"), rngs=nnx.Rngs(0))
