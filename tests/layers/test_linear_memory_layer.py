"""LinearMemory (linear attention / GLA / DeltaNet / Gated DeltaNet), its short conv and the
memory block kinds: shapes, annotations, rule selection, packing, decoding cache, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from errors import ConfigError
from layers.linear_memory import LinearMemory
from layers.short_conv import causal_depthwise_conv
from models import registry

BATCH, LENGTH, WIDTH, HEADS, HEAD_DIM = 2, 11, 16, 2, 8
RULES = ("linear_attention", "gla", "deltanet", "gated_deltanet")
KINDS = ("linear_attention", "gla", "deltanet", "gdn")
# float32 throughout: the same math along two routes (chunked with different chunk sizes,
# packed vs separate, cached vs full) agrees to ~1e-6 at these sizes.
TOL = 1e-5


def _layer(rule, seed=0, **overrides):
    options = dict(rule=rule, num_heads=HEADS, head_dim=HEAD_DIM, chunk_size=4)
    options.update(overrides)
    return LinearMemory(WIDTH, **options, rngs=nnx.Rngs(seed))


def _inputs(seed=0, length=LENGTH, batch=BATCH):
    return jax.random.normal(jax.random.key(seed), (batch, length, WIDTH), jnp.float32)


@nnx.jit
def _forward(layer, x, segment_ids=None):
    return layer(x, segment_ids=segment_ids)


def _model_config(kind, **overrides):
    config = models.default_config()
    config.vocab_size, config.d_model, config.num_heads, config.block_pattern = 32, 16, 2, (kind,)
    config[kind].chunk_size = 4
    for key, value in overrides.items():
        config[kind][key] = value
    return config


def _reference_conv(x, kernel):
    """Direct loop: y_t = Σ_j kernel[K-1-j] x_{t-j} (zeros before the start)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    taps, y = kernel.shape[0], np.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(taps):
            if t - j >= 0:
                y[:, t] += kernel[taps - 1 - j] * x[:, t - j]
    return y


def test_short_conv_matches_a_direct_loop_and_continues_from_its_state():
    x = _inputs(1)
    kernel = jax.random.normal(jax.random.key(2), (4, WIDTH))
    y, _ = causal_depthwise_conv(x, kernel)
    np.testing.assert_allclose(y, _reference_conv(x, kernel), atol=TOL)
    first, state = causal_depthwise_conv(x[:, :2], kernel)  # shorter than the kernel
    rest, _ = causal_depthwise_conv(x[:, 2:], kernel, conv_state=state)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), y, atol=TOL)


def test_short_conv_does_not_reach_into_an_earlier_segment():
    x = _inputs(3, batch=1)
    kernel = jax.random.normal(jax.random.key(4), (4, WIDTH))
    segment_ids = jnp.array([[0] * 5 + [1] * 6])
    packed, _ = causal_depthwise_conv(x, kernel, segment_ids=segment_ids)
    separate = [causal_depthwise_conv(x[:, s], kernel)[0] for s in (slice(0, 5), slice(5, None))]
    np.testing.assert_allclose(packed, jnp.concatenate(separate, 1), atol=TOL)


@pytest.mark.parametrize("rule", RULES)
def test_forward_shapes_dtypes_and_annotations(rule):
    layer = _layer(rule, expand_v=2)
    y, aux = _forward(layer, _inputs())
    assert y.shape == (BATCH, LENGTH, WIDTH) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y))) and float(aux["state_norm"]) > 0
    params = nnx.state(layer, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    for path, param in nnx.to_flat_state(params):
        spec = specs[path].get_value()
        assert len(spec) == param.get_value().ndim and all(spec), (path, spec)
    has_decay, has_beta = rule in ("gla", "gated_deltanet"), rule in ("deltanet", "gated_deltanet")
    assert hasattr(layer, "a_log") == has_decay and hasattr(layer, "beta") == has_beta


def _copy_shared_params(source, target):
    """Give `target` every parameter it shares (by path) with `source`."""
    source_params = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
    target_params = nnx.state(target, nnx.Param)
    flat = [(path, source_params[path]) for path, _ in nnx.to_flat_state(target_params)]
    nnx.update(target, nnx.from_flat_state(flat))


@pytest.mark.parametrize(
    "gated, plain", [("gated_deltanet", "deltanet"), ("gla", "linear_attention")]
)
def test_a_decay_forced_to_zero_gives_the_undecayed_rule(gated, plain):
    x = _inputs(5)
    gated_layer, plain_layer = _layer(gated), _layer(plain)
    _copy_shared_params(gated_layer, plain_layer)
    decayed, _ = _forward(gated_layer, x)
    undecayed, _ = _forward(plain_layer, x)
    # The rule matters: with its learned decay the gated layer differs from the plain one.
    assert float(jnp.max(jnp.abs(decayed - undecayed))) > 1e-4
    gated_layer.a_log[...] = jnp.full_like(gated_layer.a_log[...], -1e4)  # exp(A_log) = 0: g = 0
    no_decay, _ = _forward(gated_layer, x)
    np.testing.assert_allclose(no_decay, undecayed, atol=TOL)


@pytest.mark.parametrize("rule", RULES)
def test_chunked_layer_equals_the_token_by_token_reference(rule):
    x = _inputs(6)
    chunked, _ = _forward(_layer(rule), x)
    reference, _ = _forward(_layer(rule, impl="reference"), x)
    np.testing.assert_allclose(chunked, reference, atol=TOL)


@pytest.mark.parametrize("rule", RULES)
def test_packed_batch_equals_segments_run_separately(rule):
    layer, x = _layer(rule), _inputs(7, length=10, batch=1)
    segment_ids = jnp.array([[3] * 5 + [4] * 5])  # the boundary falls inside a chunk of 4
    packed, _ = _forward(layer, x, segment_ids)
    first, _ = _forward(layer, x[:, :5])
    second, _ = _forward(layer, x[:, 5:])
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=TOL)


# Linear attention as Katharopoulos et al. define it (the "linear_attention" kind's defaults).
NORMALIZED = dict(feature_map="elu1", normalize=True)


@pytest.mark.parametrize("rule", ["linear_attention", "gla"])
def test_normalized_layer_chunked_reference_and_packing(rule):
    x = _inputs(11, length=10, batch=1)
    layer = _layer(rule, **NORMALIZED)
    chunked, _ = _forward(layer, x)
    reference, _ = _forward(_layer(rule, impl="reference", **NORMALIZED), x)
    np.testing.assert_allclose(chunked, reference, atol=TOL)
    # Without the normaliser (same weights) the layer computes something else.
    plain, _ = _forward(_layer(rule, feature_map="elu1"), x)
    assert float(jnp.max(jnp.abs(plain - chunked))) > 0.1 * float(jnp.max(jnp.abs(chunked)))
    segment_ids = jnp.array([[3] * 5 + [4] * 5])  # z resets with S inside a chunk of 4
    packed, _ = _forward(layer, x, segment_ids)
    first, _ = _forward(layer, x[:, :5])
    second, _ = _forward(layer, x[:, 5:])
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=TOL)


def test_normalizer_needs_an_additive_rule():
    with pytest.raises(ValueError, match="additive rule"):
        _layer("deltanet", normalize=True)
    with pytest.raises(ValueError, match="feature_map"):
        _layer("gla", feature_map="relu")


def _check_extend_matches_forward(block, x, split):
    """Full forward == extend token by token == extend of x[:, :split] then the rest.

    (split = T / 2 lets both halves share one compiled `extend`.)"""
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    full, _ = nnx.jit(lambda block, x: block(x, positions=positions))(block, x)
    extend = nnx.jit(lambda block, x, cache, p: block.extend(x, cache, positions=p))
    cache = block.init_cache(x.shape[0], x.shape[1])
    steps = []
    for t in range(x.shape[1]):
        y, cache = extend(block, x[:, t : t + 1], cache, positions[:, t : t + 1])
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=TOL)
    cache = block.init_cache(x.shape[0], x.shape[1])
    prefix, cache = extend(block, x[:, :split], cache, positions[:, :split])
    rest, _ = extend(block, x[:, split:], cache, positions[:, split:])
    np.testing.assert_allclose(jnp.concatenate([prefix, rest], 1), full, atol=TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_extend_equals_forward(kind):
    block = registry.build_block(kind, _model_config(kind), layer_index=0, rngs=nnx.Rngs(0))
    _check_extend_matches_forward(block, _inputs(8, length=8), split=4)


def test_extend_without_short_conv():
    config = _model_config("gdn", conv_size=0)
    block = registry.build_block("gdn", config, layer_index=0, rngs=nnx.Rngs(0))
    assert set(block.init_cache(1, 5)) == {"state"}
    _check_extend_matches_forward(block, _inputs(9, length=6), split=3)


def test_tiny_lm_training_step_has_finite_gradients():
    """One LM with a layer of each kind (one compile instead of four)."""
    config = _model_config("gdn")
    config.num_layers, config.block_pattern = len(KINDS), KINDS
    for kind in KINDS:
        config[kind].chunk_size = 4
    model = models.build_model(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(10), (2, 13), 0, 32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": jnp.ones((2, 12))}
    graphdef, params = nnx.split(model)

    def loss(params):
        terms = nnx.merge(graphdef, params).loss_terms(batch)
        return terms["ce_sum"] / terms["count"] + terms["aux_loss"]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) > 0 for g in leaves) == len(leaves)  # all trained


def test_bad_options_name_their_key():
    with pytest.raises(ConfigError, match=r"model\.gdn\.conv_size"):
        models.build_model(_model_config("gdn", conv_size=-1), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.deltanet\.impl"):
        models.build_model(_model_config("deltanet", impl="cuda"), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.gla\.expand_v"):
        models.build_model(_model_config("gla", expand_v=0), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.linear_attention\.feature_map"):
        config = _model_config("linear_attention", feature_map="relu")
        models.build_model(config, rngs=nnx.Rngs(0))
