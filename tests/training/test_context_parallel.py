"""Context parallelism (mesh.context: T split over devices) gives the loss and gradients of
pure data parallel, for every block kind it splits; the others are refused (8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from errors import ConfigError
from training import config_validation
from training import sharding as sharding_lib
from training.state import init_params, model_spec
from training.step import model_terms

# The "within 1e-5": besides the cross-device sums of tests/training/test_sharding.py,
# a shard boundary ends a chunk of the float32 chunked recurrences and adds the state
# composition A S + B, so gradients differ by up to ~4e-6 (GLA, DeltaNet) where one device
# runs the sequence in one chunk; float64 cannot check the algebra here (the recurrences
# compute in float32), but a wrong composition would differ at O(1).
RTOL, ATOL = 1e-5, 1e-5
SEQ_LEN, BATCH = 32, 8


def kind_config(kind, **model_options):
    config = base.get_config()
    config.data.name = "mqar"
    config.data.seq_len = SEQ_LEN
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.num_layers = 2
    config.model.block_pattern = (kind,)
    for key, value in model_options.items():
        config.model[kind][key] = value
    config.train.batch_size = BATCH
    return config_validation.validate(config, base.get_config())


def packed_batch(vocab_size, seed=0):
    """Random tokens in packed documents: one starts exactly at a shard boundary of 4
    shards (token 16), others inside shards, one row is a single document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (BATCH, SEQ_LEN + 1))
    starts = np.zeros((BATCH, SEQ_LEN), np.int32)
    starts[:, [5, 16, 27]] = 1
    starts[0] = 0
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "mask": jnp.ones((BATCH, SEQ_LEN), jnp.float32),
        "segment_ids": jnp.asarray(np.cumsum(starts, axis=1), jnp.int32),
    }


def loss_and_grads(config, batch, *, data, context):
    spec = model_spec(config.model, config.seed)
    params = init_params(config.model, config.seed)
    config.mesh.data, config.mesh.context = data, context
    mesh = sharding_lib.make_mesh(config.mesh)
    sharding_lib.check_context_parallel(config, context)

    def loss_fn(params):
        terms = model_terms(spec, params, batch)
        return terms["ce_sum"] / terms["count"] + terms["aux_loss"]

    shardings = sharding_lib.param_shardings(params, spec.logical_specs, mesh, config.mesh.rules)
    params = jax.device_put(params, shardings)
    batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
    step = jax.jit(
        jax.value_and_grad(loss_fn), out_shardings=(sharding_lib.replicated(mesh), shardings)
    )
    if context > 1:  # the split path really runs: its collectives are in the program
        with jax.set_mesh(mesh):
            program = step.lower(params).as_text()
        collective = (
            "collective_permute" if kind_of(config) in ("attention", "swa") else "all_gather"
        )
        assert f"stablehlo.{collective}" in program
    return sharding_lib.under_mesh(mesh, step)(params)


def kind_of(config):
    (kind,) = config.model.block_pattern
    return kind


CASES = [
    ("attention", {}),
    ("swa", {"window": 6}),  # shorter than a shard (8 tokens), so the halo is all it needs
    ("linear_attention", {}),  # with its normaliser (an extra state column)
    ("linear_attention", {"normalize": False}),
    ("gla", {}),
    ("deltanet", {}),
    ("gdn", {"chunk_size": 4}),  # two chunks per shard
    ("mom", {}),  # its memories folded into heads, each on its routed tokens
]


@pytest.mark.parametrize("kind, options", CASES, ids=[f"{k}{'-' if o else ''}{'-'.join(o)}"
                                                      for k, o in CASES])  # fmt: skip
def test_context_parallel_matches_data_parallel(kind, options):
    config = kind_config(kind, **options)
    batch = packed_batch(config.model.vocab_size)
    expected = loss_and_grads(config, batch, data=8, context=1)
    got = loss_and_grads(config, batch, data=2, context=4)
    np.testing.assert_allclose(got[0], expected[0], rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
                 got[1], expected[1])  # fmt: skip


def test_a_kind_that_cannot_be_split_is_refused_by_name():
    config = kind_config("lmm")
    with pytest.raises(ConfigError, match="mesh.context=4: block kind 'lmm' cannot be split"):
        sharding_lib.check_context_parallel(config, 4)


@pytest.mark.parametrize(
    "seq_len, window, message",
    [(30, 4, "data.seq_len=30 is not divisible"), (32, 12, "model.swa.window=12 exceeds")],
)
def test_bad_context_layouts_are_named(seq_len, window, message):
    config = kind_config("swa", window=window)
    config.data.seq_len = seq_len
    with pytest.raises(ConfigError, match=message):
        sharding_lib.check_context_parallel(config, 4)
