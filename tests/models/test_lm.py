"""The LM wrapper: shapes, heads, block patterns, annotations, dtypes, remat, errors, packing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import models
from errors import ConfigError
from models import registry
from models.lm import LanguageModel, TransformerBlock, segment_positions

BATCH, LENGTH, VOCAB, WIDTH = 2, 16, 32, 32
# float32 model outputs computed along two routes of the same math (packed vs separate,
# remat vs not, chunked vs plain loss) agree to ~1e-6.
TOL = 1e-5


def _config(**overrides):
    config = models.default_config()
    config.vocab_size = VOCAB
    config.d_model = WIDTH
    config.num_heads = 2
    config.swa.window = 4
    for key, value in overrides.items():
        config[key] = value
    return config


def _batch(seed=0, length=LENGTH):
    tokens = jax.random.randint(jax.random.key(seed), (BATCH, length + 1), 0, VOCAB)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "mask": jnp.ones((BATCH, length), jnp.int32),
    }


def _split_loss(model):
    """(graphdef, params, loss(params, batch)) as the training step sees the model."""
    graphdef, params = nnx.split(model)

    def loss(params, batch):
        terms = nnx.merge(graphdef, params).loss_terms(batch)
        return terms["ce_sum"] / terms["count"] + terms["aux_loss"]

    return graphdef, params, loss


def test_forward_shapes_and_dtypes():
    model = models.build_model(_config(), rngs=nnx.Rngs(0))
    batch = _batch()
    run = nnx.jit(lambda model, batch: (model(batch["inputs"]), model.logits(batch["inputs"])))
    (hidden, aux), logits = run(model, batch)
    assert hidden.shape == (BATCH, LENGTH, WIDTH) and hidden.dtype == jnp.float32
    assert aux == {}
    assert logits.shape == (BATCH, LENGTH, VOCAB)
    terms = nnx.jit(lambda model, batch: model.loss_terms(batch))(model, batch)
    assert set(terms) == {"ce_sum", "correct", "count", "aux_loss"}
    assert all(value.dtype == jnp.float32 and value.shape == () for value in terms.values())
    assert terms["count"] == BATCH * LENGTH
    # The width-aware init (std 1/sqrt(d_model), tied head, RMS-normalised hidden states)
    # starts with unit-variance logits, whatever the width; for Gaussian logits of variance
    # s^2 the expected cross-entropy is about ln(V) + s^2 / 2.
    variance = float(jnp.var(logits, axis=-1).mean())
    assert 0.5 < variance < 2.0, variance
    expected = np.log(VOCAB) + variance / 2
    np.testing.assert_allclose(terms["ce_sum"] / terms["count"], expected, rtol=0.1)


def test_tied_and_untied_heads():
    tied = models.build_model(_config(tie_embeddings=True), rngs=nnx.Rngs(0))
    untied = models.build_model(_config(tie_embeddings=False), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(tied.output_kernel(), tied.embedding.embedding[...].T)
    assert not hasattr(tied, "lm_head")
    assert untied.output_kernel().shape == (WIDTH, VOCAB)
    assert untied.lm_head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")

    def count(model):
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    assert count(untied) - count(tied) == WIDTH * VOCAB
    # The head is used: logits are hidden @ kernel.
    hidden, _ = untied(_batch()["inputs"])
    np.testing.assert_allclose(
        untied.logits(_batch()["inputs"]), hidden @ untied.lm_head.kernel[...], atol=TOL
    )


def test_block_pattern_mixes_kinds():
    config = _config(num_layers=3, block_pattern=("attention", "swa"))
    config.attention.num_kv_heads = 1
    model = models.build_model(config, rngs=nnx.Rngs(0))
    assert model.block_kinds == ("attention", "swa", "attention")
    assert [block.attention.window for block in model.blocks] == [0, 4, 0]
    assert [block.attention.num_kv_heads for block in model.blocks] == [1, 2, 1]
    assert all(isinstance(block, TransformerBlock) for block in model.blocks)
    hidden, _ = model(_batch()["inputs"])
    assert bool(jnp.all(jnp.isfinite(hidden)))


def test_every_parameter_has_logical_axes():
    model = models.build_model(
        _config(tie_embeddings=False, block_pattern=("attention", "swa")), rngs=nnx.Rngs(0)
    )
    params = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(params)
    flat_params = dict(nnx.to_flat_state(params))
    flat_specs = dict(nnx.to_flat_state(specs))
    assert len(flat_params) > 10
    for path, param in flat_params.items():
        spec = flat_specs[path].get_value()
        assert len(spec) == param.get_value().ndim, path
        assert all(name for name in spec), (path, spec)


def test_bfloat16_compute_is_finite_and_close_to_float32():
    batch = _batch()
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = models.build_model(_config(compute_dtype=dtype), rngs=nnx.Rngs(0))
        _, params, loss = _split_loss(model)
        value, grads = jax.jit(jax.value_and_grad(loss))(params, batch)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
        losses[dtype] = float(value)
    # bfloat16 has an 8-bit mantissa: ~1% relative error on the loss is expected.
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.02)


def test_remat_and_chunked_loss_give_the_same_loss_and_gradients():
    batch = _batch()
    results = []
    for overrides in ({}, {"remat": True}, {"loss_chunk_size": 5}):
        model = models.build_model(_config(**overrides), rngs=nnx.Rngs(0))
        _, params, loss = _split_loss(model)
        results.append(jax.jit(jax.value_and_grad(loss))(params, batch))
    (reference_loss, reference_grads), *others = results
    for value, grads in others:
        np.testing.assert_allclose(value, reference_loss, rtol=TOL)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL, atol=1e-7),
            grads,
            reference_grads,
        )


def test_segment_positions_restart_per_segment():
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 3], [5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(
        segment_positions(segment_ids), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    )


def test_packed_batch_equals_segments_run_separately():
    model = models.build_model(_config(block_pattern=("attention", "swa")), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (1, 12), 0, VOCAB)
    segment_ids = jnp.array([[1] * 5 + [2] * 7])
    forward = nnx.jit(lambda model, tokens, segment_ids: model(tokens, segment_ids=segment_ids)[0])
    packed = forward(model, tokens, segment_ids)  # positions derived from the segments
    first = forward(model, tokens[:, :5], None)
    second = forward(model, tokens[:, 5:], None)
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), atol=TOL)


def test_block_aux_entries_reach_loss_terms(monkeypatch):
    class AuxProbe(nnx.Module):
        def __init__(self, model_config, block_config, *, layer_index, rngs):
            self.weight = block_config.weight * (layer_index + 1)

        def __call__(self, x, *, positions, segment_ids=None):
            return x, {"aux_loss/probe": jnp.float32(self.weight), "state_norm": jnp.float32(1)}

    monkeypatch.setitem(registry._BLOCKS, "aux_probe", AuxProbe)
    monkeypatch.setitem(registry._BLOCK_DEFAULTS, "aux_probe", {"weight": 0.5})
    model = models.build_model(_config(block_pattern=("aux_probe",)), rngs=nnx.Rngs(0))
    terms = model.loss_terms(_batch())
    assert terms["aux_loss/layer_00/probe"] == 0.5 and terms["aux_loss/layer_01/probe"] == 1.0
    assert terms["aux_loss"] == 1.5
    assert terms["layer_01/state_norm"] == 1.0


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'nope' \(registered: lm"):
        models.build_model(_config(name="nope"), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.block_pattern: unknown block kind 'mamba'"):
        models.build_model(_config(block_pattern=("attention", "mamba")), rngs=nnx.Rngs(0))
    config = _config()
    config.attention.num_kv_heads = 3
    with pytest.raises(ConfigError, match=r"model\.attention\.num_kv_heads"):
        models.build_model(config, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.compute_dtype"):
        models.build_model(_config(compute_dtype="float16"), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.num_heads"):
        models.build_model(_config(num_heads=5), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.head_dim: RoPE needs an even"):
        models.build_model(_config(head_dim=7), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.block_pattern: must name"):
        models.build_model(_config(block_pattern=()), rngs=nnx.Rngs(0))
    config = _config(block_pattern=("swa",))
    config.swa = ml_collections.ConfigDict({"window": 8, "typo": 1})
    with pytest.raises(ConfigError, match=r"model\.swa\.typo: unknown option"):
        models.build_model(config, rngs=nnx.Rngs(0))
    assert {"attention", "swa"} <= set(models.registered_blocks())


def test_tiny_lm_overfits_one_batch():
    model = LanguageModel(_config(num_layers=2), rngs=nnx.Rngs(0))
    _, params, loss = _split_loss(model)
    batch = _batch(seed=7)
    optimizer = optax.adam(1e-2)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            value, grads = jax.value_and_grad(loss)(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        _, values = jax.lax.scan(step, (params, optimizer.init(params)), length=50)
        return values

    values = np.asarray(train(params))
    # Random tokens: ln(32) = 3.47 at init; memorising 32 next tokens takes it near 0.
    assert values[0] > 3.0 and values[-1] < 0.5, values[[0, 10, 25, -1]]
