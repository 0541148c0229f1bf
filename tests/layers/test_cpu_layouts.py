"""`layers.cpu_layouts.materialised_cotangent`: the identity, values and gradients unchanged,
and on CPU its backward really holds a conditional (jax drops a cond whose two branches are
the same jaxpr, which silently undid the workaround once)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.cpu_layouts import materialised_cotangent
from layers.mixture_of_memories import MixtureOfMemories
from layers.short_conv import causal_depthwise_conv


def _projection_then_conv(weights, kernel, x, materialise):
    projected = x @ weights
    if materialise:
        projected = materialised_cotangent(projected)
    # A circular stand-in for the short convolution: shifted reads of the projection.
    y = sum(jnp.roll(projected, tap, axis=1) * kernel[tap] for tap in range(kernel.shape[0]))
    return jnp.sum(jax.nn.silu(y) * jnp.cos(x[..., :1]))


def _inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 24, 16), dtype=np.float32))
    weights = jnp.asarray(rng.standard_normal((16, 16), dtype=np.float32) / 4)
    kernel = jnp.asarray(rng.standard_normal((4, 16), dtype=np.float32))
    return weights, kernel, x


def test_values_and_gradients_are_bit_identical():
    args = _inputs()
    grads = [
        jax.jit(jax.grad(_projection_then_conv, argnums=(0, 1, 2)), static_argnums=3)(*args, m)
        for m in (False, True)
    ]
    for plain, materialised in zip(*grads, strict=True):
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(materialised))
    x = args[2]
    np.testing.assert_array_equal(np.asarray(materialised_cotangent(x)), np.asarray(x))


def test_cpu_backward_holds_a_conditional_and_the_forward_none():
    weights, kernel, x = _inputs()
    backward = jax.jit(jax.grad(lambda w: _projection_then_conv(w, kernel, x, True)))
    assert "conditional(" in backward.lower(weights).compile().as_text()
    forward = jax.jit(lambda w: _projection_then_conv(w, kernel, x, True))
    assert "conditional(" not in forward.lower(weights).compile().as_text()


def test_short_conv_backward_uses_it():
    weights, kernel, x = _inputs()

    def loss(w):
        y, _ = causal_depthwise_conv(x @ w, kernel)
        return jnp.sum(y * y)

    assert "conditional(" in jax.jit(jax.grad(loss)).lower(weights).compile().as_text()


def test_under_vmap_the_conditional_is_lost_so_mom_applies_it_outside():
    """vmap turns the data-dependent cond into a select, which XLA fuses through: MoM's
    routed convolutions (one per memory, vmapped) take the workaround on the stacked
    projection before the vmap, so their backward holds a conditional."""
    weights, kernel, x = _inputs()

    def vmapped(w):
        projected = x @ w  # [2, 24, 16]: vmap over the first axis
        inner = jax.vmap(lambda p: jnp.sin(materialised_cotangent(p)) * kernel[0])
        return jnp.sum(inner(projected))

    assert "conditional(" not in jax.jit(jax.grad(vmapped)).lower(weights).compile().as_text()

    layer = MixtureOfMemories(16, num_memories=3, top_k=2, num_heads=2, head_dim=8,
                              rngs=nnx.Rngs(0))  # fmt: skip
    routed = jnp.asarray(np.random.default_rng(1).random((2, 24, 4)) < 0.5)
    conv_state = layer._zero_conv_states(2)[0]

    def routed_convs(w):
        projected = jnp.einsum("btd,mdc->btmc", x, w)
        y, _ = layer._memory_conv(projected, layer.key_conv_kernel, routed, conv_state, None)
        return jnp.sum(y * y)

    stacked_weights = layer.key_kernel[...]
    program = jax.jit(jax.grad(routed_convs)).lower(stacked_weights).compile().as_text()
    assert "conditional(" in program
