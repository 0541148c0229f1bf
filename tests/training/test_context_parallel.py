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

# The "within 1e-5" holds for the loss (all kinds agree to ~2e-7). Gradients are
# compared as one vector, ||g_context - g|| / ||g||: a wrong state composition, or a state
# that does not cross a shard boundary, moves them at 1e-3 or more, while float32 rounding
# alone moves them by up to ~3e-5 in these models -- the same as changing data parallel for
# FSDP does (MAL: 2.8e-5 FSDP vs data, 3.5e-5 context vs data; measured 2026-12-04), because
# an embedding row's gradient sums hundreds of terms whose order the layout changes.
LOSS_RTOL, GRADIENT_RTOL = 1e-5, 1e-4
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


MATRIX_MEMORIES = ("linear_attention", "gla", "deltanet", "gdn", "mom")
CASES = [
    ("attention", {}),
    ("swa", {"window": 6}),  # shorter than a shard (8 tokens), so the halo is all it needs
    ("linear_attention", {}),  # with its normaliser (an extra state column)
    ("linear_attention", {"normalize": False}),
    ("gla", {}),
    ("deltanet", {}),
    ("gdn", {"chunk_size": 4}),  # two chunks per shard
    ("mom", {}),  # its memories folded into heads, each on its routed tokens
    ("lmm", {"chunk_size": 4}),  # the deep memories: pipelined over the rows of a shard
    ("mal", {"window": 6, "chunk_size": 8}),
    ("mag", {"window": 6, "chunk_size": 8}),  # + persistent tokens every shard sees
    ("atlas", {"chunk_size": 4}),  # the Omega window (c = 4) spans shard boundaries
    ("mac", {"segment_size": 4, "chunk_size": 2}),  # two segments per shard, unpacked rows
    pytest.param("yaad", {"chunk_size": 8}, marks=pytest.mark.slow),  # lmm's path, Huber bias
]


@pytest.mark.parametrize("kind, options", CASES)
def test_context_parallel_matches_data_parallel(kind, options):
    config = kind_config(kind, **options)
    batch = packed_batch(config.model.vocab_size)
    if kind == "mac":  # its segments are fixed windows of the row: no packed documents
        del batch["segment_ids"]
    expected = loss_and_grads(config, batch, data=8, context=1)
    got = loss_and_grads(config, batch, data=2, context=4)
    np.testing.assert_allclose(got[0], expected[0], rtol=LOSS_RTOL)
    got, expected = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in
                     (got[1], expected[1]))  # fmt: skip
    assert np.linalg.norm(got - expected) <= GRADIENT_RTOL * np.linalg.norm(expected)


def test_a_kind_that_cannot_be_split_is_refused_by_name():
    config = kind_config("gdn_mc")
    with pytest.raises(ConfigError, match="mesh.context=4: block kind 'gdn_mc' cannot be split"):
        sharding_lib.check_context_parallel(config, 4)


@pytest.mark.parametrize(
    "kind, seq_len, options, message",
    [
        ("swa", 30, {}, "data.seq_len=30 is not divisible"),
        ("swa", 32, {"window": 12}, "model.swa.window=12 exceeds a shard's 8 tokens"),
        ("lmm", 32, {"chunk_size": 16}, "model.lmm.chunk_size=16 does not divide a shard's 8"),
        ("mac", 32, {"segment_size": 16}, "model.mac.segment_size=16 does not divide a shard's 8"),
    ],
)
def test_bad_context_layouts_are_named(kind, seq_len, options, message):
    config = kind_config(kind, **options)
    config.data.seq_len = seq_len
    with pytest.raises(ConfigError, match=message):
        sharding_lib.check_context_parallel(config, 4)


def test_memora_lag_token_chunk_splits_over_context_in_float64():
    """Memora's default chunk (Miras §5.4's lag-token form) with T over 4 "context" devices,
    unpacked rows (it refuses packed ones): outputs, final state and input gradients of the
    single-device run. In float64: its chunk end takes the log of weights near the
    probability floor, which amplifies float32 rounding -- a model's gradients moved by
    5e-4 to 9e-4 between layouts (the exact kl chunk's by 9e-6); float64 checks the split."""
    from layers import context_parallel
    from pallas_kernels.neural_memory import MemorySpec, chunked
    from tests.pallas_kernels.test_neural_memory import F64_TOL, max_relative_error
    from tests.pallas_kernels.test_neural_memory_choices import make_inputs

    spec = MemorySpec(retention="kl", kl_chunk_form="lag_token", rule="gd")
    mesh = jax.make_mesh(
        (2, 1, 4), sharding_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    with jax.enable_x64(True):
        inputs, state = make_inputs(spec, seq_len=16, seed=3, dtype=jnp.float64)
        probe = np.random.default_rng(4).standard_normal(inputs.v.shape)

        def run(split, x):
            if split:
                return context_parallel.deep_memory(spec, x, state, chunk_size=4)
            return chunked.chunked_scan(spec, x, state, 4)

        def loss(split, x):
            return jnp.sum(run(split, x)[0] * probe)

        expected = run(False, inputs), jax.grad(lambda x: loss(False, x))(inputs)
        with jax.set_mesh(mesh):
            got = jax.jit(lambda x: (run(True, x), jax.grad(lambda y: loss(True, y))(x)))(inputs)
        assert max_relative_error(got[0], expected[0]) < F64_TOL
        for key, value in expected[1].named().items():
            assert max_relative_error(got[1].named()[key], value) < F64_TOL, key
