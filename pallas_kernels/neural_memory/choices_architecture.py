"""Memory architectures of the deep memory (Miras choice 1): a matrix or a residual MLP.

Split out of `choices.py` (which re-exports every name here). Shapes: tokens `[..., t, d]`,
weights `[..., d_in, d_out]` (Flax layout, a layer computes `x @ W`).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Activation:
    """sigma between MLP layers, with its derivative written out for the chunked backprop."""

    name: str
    fn: Callable[[jax.Array], jax.Array]
    derivative: Callable[[jax.Array], jax.Array]


def gelu(x):
    """Exact (erf) GELU: x Phi(x)."""
    return x * 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def gelu_derivative(x):
    """d/dx x Phi(x) = Phi(x) + x phi(x)."""
    cdf = 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))
    pdf = jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def silu(x):
    return x * jax.nn.sigmoid(x)


def silu_derivative(x):
    """d/dx x s(x) = s(x) (1 + x (1 - s(x)))."""
    s = jax.nn.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


ACTIVATIONS = {
    "gelu": Activation("gelu", gelu, gelu_derivative),
    "silu": Activation("silu", silu, silu_derivative),
}


# ------------------------------------------------------------------ parameter-free layer norm


def layer_norm(z, eps):
    """LN without learnable scale/shift: (z - mean) / sqrt(var + eps) over the last axis."""
    centred = z - jnp.mean(z, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)


def layer_norm_vjp(z, cotangent, eps):
    """Cotangent of z given that of LN(z): (c - mean(c) - n mean(c n)) / sqrt(var + eps)."""
    centred = z - jnp.mean(z, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    normed = centred * inv_std
    mean_c = jnp.mean(cotangent, axis=-1, keepdims=True)
    mean_cn = jnp.mean(cotangent * normed, axis=-1, keepdims=True)
    return inv_std * (cotangent - mean_c - normed * mean_cn)


# ------------------------------------------------------------------- memory architecture


@dataclass(frozen=True)
class MemoryArchitecture:
    """A chain of weight matrices: z_1 = x W_1, z_{l+1} = sigma(z_l) W_{l+1}, then a readout.

    matrix: one layer, M(x) = x W (the linear-attention / DeltaNet state, Titans eq. 12 with
    a linear memory). mlp: M(x) = x + LN(z_L) (Titans §3.1 "deep memory" with residual and
    a parameter-free norm); depth L >= 1 layers, the hidden ones `expansion` times wider.
    With d_in > d_out (keys through ATLAS's monomial map, `layers.feature_maps`) the residual
    is x[..., :d_out], the map's degree-1 block: M(φ(x)) = s_1 x + LN(z_L).
    """

    layer_names: tuple[str, ...]
    activation: Activation | None  # None only for a single layer
    residual_norm: bool
    norm_eps: float = 1e-6

    def run_layers(self, x, pre_activation):
        """Forward with a caller-supplied `pre_activation(layer_index, layer_input) -> z`.

        The chunked form passes a layer that reads a different weight per token; plain
        `forward` passes `x @ W`. Returns (output, (layer_inputs, pre_activations)).
        """
        inputs, pre_activations = [], []
        hidden = x
        last = len(self.layer_names) - 1
        for index in range(len(self.layer_names)):
            inputs.append(hidden)
            z = pre_activation(index, hidden)
            pre_activations.append(z)
            if index < last:
                hidden = self.activation.fn(z)
        z_last = pre_activations[-1]
        if not self.residual_norm:
            return z_last, (inputs, pre_activations)
        output = x[..., : z_last.shape[-1]] + layer_norm(z_last, self.norm_eps)
        return output, (inputs, pre_activations)

    def forward(self, weights, x, scale=1.0):
        """M(x) with every weight multiplied by `scale` ([..., t, 1] per token, or a number).

        Scaling all weights by gamma scales each pre-activation by gamma, which is how the
        chunk-start memory decayed to token i (gamma_i M_{c0}) is evaluated without copies.
        """
        names = self.layer_names
        return self.run_layers(x, lambda index, h: scale * (h @ weights[names[index]]))

    def backward(self, weights, cache, output_grad, scale=1.0):
        """Per-layer gradient factors of a loss with cotangent `output_grad` at the output.

        Returns [(a_l, delta_l)] with dLoss/dW_l = a_l^T delta_l summed over tokens (one outer
        product per token): a_l the layer's input, delta_l the cotangent of its
        pre-activation. `scale` must be the one given to `forward` (the weights it used).
        """
        inputs, pre_activations = cache
        delta = output_grad
        if self.residual_norm:  # the residual x does not depend on the weights
            delta = layer_norm_vjp(pre_activations[-1], delta, self.norm_eps)
        factors = [None] * len(self.layer_names)
        for index in reversed(range(len(self.layer_names))):
            factors[index] = (inputs[index], delta)
            if index > 0:
                weight_t = jnp.swapaxes(weights[self.layer_names[index]], -1, -2)
                hidden_grad = scale * (delta @ weight_t)
                delta = hidden_grad * self.activation.derivative(pre_activations[index - 1])
        return factors


def matrix_architecture():
    return MemoryArchitecture(layer_names=("W",), activation=None, residual_norm=False)


def mlp_architecture(depth, activation, norm_eps):
    names = tuple(f"W{index + 1}" for index in range(depth))
    return MemoryArchitecture(names, ACTIVATIONS[activation], residual_norm=True, norm_eps=norm_eps)
