"""A new Miras choice with a per-token input of its own costs its table entries only.

The bias below, l = 1/2 w_t ||M(k) - v||^2 with a learned per-token weight w_t, is registered
here the way a researcher would add it: its functions and `AttentionalBias` entry (in
`pallas_kernels/neural_memory/choices.py` / `choices_miras.py`) and the layer's projection
for w_t (`layers.neural_memory.EXTRA_INPUTS`). Nothing else changes, yet the reference, the
chunked form (with and without an Omega window, which carries the input), the layer's
forward and backward and its decoding cache all take the new input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import neural_memory as layer_module
from pallas_kernels.neural_memory import (
    MemoryInputs,
    MemorySpec,
    TokenInput,
    choices,
    chunked,
    neural_memory,
    reference,
)
from tests.layers.test_neural_memory_layer import TOL, _extend, _inputs, _layer

ERROR_WEIGHT = TokenInput("error_weight", pad=1.0, empty=1.0)


def weighted_l2_loss(prediction, value, *, error_weight):
    return 0.5 * error_weight * jnp.sum(jnp.square(prediction - value), axis=-1)


def weighted_l2_output_grad(prediction, value, *, error_weight):
    return error_weight[..., None] * (prediction - value)


@pytest.fixture
def weighted_l2(monkeypatch):
    """The three entries: the bias, its declared input, and the layer's projection."""
    bias = choices.AttentionalBias(
        "weighted_l2", weighted_l2_loss, weighted_l2_output_grad, inputs=(ERROR_WEIGHT,)
    )
    monkeypatch.setitem(choices.ATTENTIONAL_BIASES, "weighted_l2", bias)
    extra = layer_module.ExtraInput("error_weight_projection", lambda _: 0.0, jax.nn.sigmoid)
    monkeypatch.setitem(layer_module.EXTRA_INPUTS, "error_weight", extra)


@pytest.mark.parametrize("omega_window", [1, 2])
def test_reference_and_chunked_take_the_new_input(weighted_l2, omega_window):
    spec = MemorySpec(bias="weighted_l2", rule="momentum", omega_window=omega_window)
    layer = _layer(spec)
    inputs, _ = layer.features(_inputs())
    assert set(inputs.extra) == {"error_weight"} | ({"omega_gate"} if omega_window > 1 else set())
    state = layer.initial_state(inputs.q.shape[0])
    assert omega_window == 1 or "error_weight" in state.window

    exact = jax.jit(lambda x: reference.exact_scan(spec, x, state))(inputs)
    one = jax.jit(lambda x: chunked.chunked_scan(spec, x, state, 1))(inputs)
    start = jax.jit(lambda x: reference.chunk_start_scan(spec, x, state, 4))(inputs)
    four = jax.jit(lambda x: chunked.chunked_scan(spec, x, state, 4))(inputs)  # T 11: padded
    for actual, expected in ((one, exact), (four, start)):
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL)

    # w_t = 1 is the l2 bias exactly; the learned weights are not all 1.
    ones = inputs.replace(extra={**inputs.extra, "error_weight": jnp.ones_like(inputs.lr)})
    l2 = MemorySpec(bias="l2", rule="momentum", omega_window=omega_window)
    plain = inputs.replace(extra={k: x for k, x in inputs.extra.items() if k != "error_weight"})
    l2_state = state._replace(
        window=None if state.window is None else {k: x for k, x in state.window.items()
                                                   if k != "error_weight"}
    )  # fmt: skip
    np.testing.assert_array_equal(
        reference.exact_scan(spec, ones, state)[0], reference.exact_scan(l2, plain, l2_state)[0]
    )
    assert float(jnp.max(jnp.abs(exact[0] - reference.exact_scan(spec, ones, state)[0]))) > 1e-4


def test_layer_trains_and_decodes_with_the_new_input(weighted_l2):
    layer = _layer(MemorySpec(bias="weighted_l2", rule="momentum"))

    def loss(module):
        out, _ = module(_inputs())
        return jnp.sum(out**2)

    grads = nnx.jit(nnx.grad(loss))(layer)
    projection = jax.tree.leaves(grads["error_weight_projection"])
    assert max(float(jnp.max(jnp.abs(g))) for g in projection) > 0

    x = _inputs()
    full, _ = layer(x)
    cache = layer.init_cache(x.shape[0])
    assert isinstance(cache["chunk"], MemoryInputs) and "error_weight" in cache["chunk"].extra
    first, cache = _extend(layer, x[:, :5], cache)
    second, _ = _extend(layer, x[:, 5:], cache)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, rtol=TOL, atol=TOL)


def test_an_undeclared_input_is_refused_by_name(weighted_l2):
    layer = _layer(MemorySpec(bias="weighted_l2", rule="momentum"))
    inputs, _ = layer.features(_inputs())
    state = layer.initial_state(inputs.q.shape[0])
    with pytest.raises(ValueError, match="error_weight"):
        neural_memory(inputs.replace(extra={}), memory=layer.spec, initial_state=state)
    with pytest.raises(ValueError, match="EXTRA_INPUTS"):
        layer_module.EXTRA_INPUTS.pop("error_weight")
        _layer(MemorySpec(bias="weighted_l2", rule="momentum"))
