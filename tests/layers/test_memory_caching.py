"""Memory caching (`layers.memory_caching`): the fast form against the naive per-segment
loop of `layers.memory_caching_reference` (outputs and every gradient, each aggregation,
a length that is not a multiple of segment_size), decoding against the full forward, and
the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from errors import DataError
from layers import memory_caching_reference
from layers.linear_memory import LinearMemory
from layers.memory_caching import GatedDeltaNetMemoryCaching, NeuralMemoryCaching, aggregate
from layers.neural_memory import NeuralMemory
from pallas_kernels.neural_memory import MemorySpec

BATCH, WIDTH, HEADS, HEAD_DIM = 2, 16, 2, 8
SEGMENT, LENGTH = 4, 11  # two whole segments and a partial third
TOL = 1e-5  # float32 values and gradients: the two forms sum the same terms in another order


def _layer(memory_kind, aggregation, segment_size=SEGMENT):
    rngs = nnx.Rngs(0)
    common = dict(num_heads=HEADS, head_dim=HEAD_DIM, init_std=0.3, rngs=rngs)
    if memory_kind == "gdn":
        memory = LinearMemory(WIDTH, rule="gated_deltanet", chunk_size=2, **common)
        wrapper = GatedDeltaNetMemoryCaching
    else:
        memory = NeuralMemory(WIDTH, spec=MemorySpec(), chunk_size=2, **common)
        wrapper = NeuralMemoryCaching
    return wrapper(
        memory, segment_size=segment_size, aggregation=aggregation, top_k=1, init_std=0.3,
        rngs=rngs,
    )  # fmt: skip


def _inputs(length=LENGTH, seed=1):
    return jax.random.normal(jax.random.key(seed), (BATCH, length, WIDTH), jnp.float32)


def _values_and_gradients(forward, layer, x):
    """forward(layer, x) and the gradients of a fixed random projection of it with respect
    to every parameter and to x."""
    weights = jax.random.normal(jax.random.key(2), (BATCH, x.shape[1], WIDTH))
    graph, params = nnx.split(layer)

    @jax.jit
    def run(params, x):
        def loss(params, x):
            y = forward(nnx.merge(graph, params), x)
            return jnp.sum(y * weights), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, grads

    return run(params, x)


def _fast(layer, x):
    return layer(x)[0]


def _assert_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, atol=TOL, rtol=TOL)


# A case with gradients compiles two forwards and their backward passes (~20 s of CPU for
# Gated DeltaNet, ~35 s for the neural memory), so CI runs Gated DeltaNet's ssc (masks,
# top-k, gates) with gradients and the neural memory's grm on values; the rest is `slow`.
SLOW = pytest.mark.slow
PARITY_CASES = [
    ("gdn", "ssc", True),
    ("lmm", "grm", False),
    pytest.param("lmm", "grm", True, marks=SLOW),
    pytest.param("gdn", "grm", True, marks=SLOW),
    pytest.param("gdn", "residual", True, marks=SLOW),
    pytest.param("lmm", "ssc", True, marks=SLOW),
    pytest.param("lmm", "residual", True, marks=SLOW),
]


@pytest.mark.parametrize("memory_kind, aggregation, gradients", PARITY_CASES)
def test_fast_form_matches_the_per_segment_reference(memory_kind, aggregation, gradients):
    layer, x = _layer(memory_kind, aggregation), _inputs()
    if not gradients:
        y, y_ref = nnx.jit(_fast)(layer, x), nnx.jit(memory_caching_reference.forward)(layer, x)
        _assert_close(y, y_ref)
        return
    y, grads = _values_and_gradients(_fast, layer, x)
    y_ref, grads_ref = _values_and_gradients(memory_caching_reference.forward, layer, x)
    assert y.shape == x.shape and float(jnp.max(jnp.abs(y))) > 0.05
    _assert_close(y, y_ref)
    _assert_close(grads, grads_ref)
    # The cached states are read and trained: their gradient reaches the gate projection.
    if aggregation != "residual":
        gate = jax.tree.leaves(grads[0]["gate_query"])
        assert max(float(jnp.max(jnp.abs(g))) for g in gate) > 0


@pytest.mark.parametrize("memory_kind", ["gdn", pytest.param("lmm", marks=SLOW)])
def test_caching_changes_outputs_only_after_the_first_segment(memory_kind):
    layer, x = _layer(memory_kind, "residual"), _inputs()
    y = nnx.jit(_fast)(layer, x)
    online = layer.memory(x)[0]  # the same memory without caching
    np.testing.assert_allclose(y[:, :SEGMENT], online[:, :SEGMENT], atol=TOL, rtol=TOL)
    assert float(jnp.max(jnp.abs(y[:, SEGMENT:] - online[:, SEGMENT:]))) > 1e-3


@SLOW
def test_ssc_keeps_top_k_and_equals_grm_when_top_k_covers_every_segment():
    layer, x = _layer("gdn", "ssc"), _inputs()
    y_ssc = nnx.jit(_fast)(layer, x)
    layer.top_k = LENGTH  # every cached segment kept: ssc is grm
    y_all = nnx.jit(_fast)(layer, x)
    layer.aggregation = "grm"
    y_grm = nnx.jit(_fast)(layer, x)
    np.testing.assert_allclose(y_all, y_grm, atol=TOL, rtol=TOL)
    # With top_k = 1 the tokens of the third segment (two cached states) read one of them.
    assert float(jnp.max(jnp.abs(y_ssc[:, 2 * SEGMENT :] - y_grm[:, 2 * SEGMENT :]))) > 1e-4
    np.testing.assert_allclose(y_ssc[:, : 2 * SEGMENT], y_grm[:, : 2 * SEGMENT], atol=TOL)


def test_aggregate_masks_segments_a_token_cannot_see():
    online = jnp.ones((1, 2, 1, 1))
    reads = jnp.full((1, 2, 2, 1, 1), 10.0)
    visible = jnp.array([[[False, False], [True, False]]])
    y = aggregate("residual", 1, online, reads, visible)
    np.testing.assert_allclose(y[0, :, 0, 0], [1.0, 11.0])
    scores = jnp.zeros((1, 2, 2, 1))
    y = aggregate("grm", 1, online, reads, visible, scores, jnp.zeros((1, 2, 1)))
    np.testing.assert_allclose(y[0, :, 0, 0], [1.0, 5.5], rtol=1e-6)


@pytest.mark.parametrize(
    "memory_kind, aggregation",
    [
        ("gdn", "ssc"),
        pytest.param("gdn", "grm", marks=SLOW),
        pytest.param("lmm", "grm", marks=SLOW),
        pytest.param("lmm", "residual", marks=SLOW),
    ],
)
def test_prefill_then_decoding_equals_the_full_forward(memory_kind, aggregation):
    layer, x = _layer(memory_kind, aggregation), _inputs(length=13)
    full = nnx.jit(_fast)(layer, x)
    extend = nnx.jit(lambda layer, x, cache: layer.extend(x, cache))
    cache = layer.init_cache(BATCH, 16)
    outputs, start = [], 0
    for length in (6, 1, 1, 1, 3, 1):  # a prefill crossing a segment end, steps, a chunk
        y, cache = extend(layer, x[:, start : start + length], cache)
        outputs.append(y)
        start += length
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=TOL, rtol=TOL)
    assert int(cache["length"]) == 13


def test_refusals():
    layer = _layer("gdn", "grm")
    segment_ids = jnp.zeros((BATCH, 8), jnp.int32)
    with pytest.raises(DataError, match="segment_ids"):
        layer(_inputs(length=8), segment_ids=segment_ids)
    with pytest.raises(ValueError, match="chunk_size"):
        _layer("lmm", "grm", segment_size=3)
    with pytest.raises(ValueError, match="aggregation"):
        _layer("gdn", "mean")
