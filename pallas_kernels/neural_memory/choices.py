"""The four Miras choices of a deep memory, as small named pieces composed by `MemorySpec`.

Miras ("It's All Connected", 2025) writes every test-time memory as (architecture, attentional
bias, retention, learning rule); Titans (Behrouz et al. 2024, eqs. 8-18) is one point:
MLP memory, l2 bias, gated decay, GD + momentum. Each choice below is a frozen dataclass of
plain functions, looked up by name, so a new bias or rule is one new entry, not a new branch
in every implementation.

Shapes: tokens are `[..., t, d]` (leading batch/head dims), weights `[..., d_in, d_out]`
(Flax `[in, out]` layout, so a layer computes `x @ W`), per-token scalars `[..., t]`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

Weights = dict[str, jax.Array]


def at_least_float32(x):
    """Compute dtype: bfloat16/float16 -> float32; float64 (under jax x64) stays float64."""
    return None if x is None else x.astype(jnp.promote_types(x.dtype, jnp.float32))


class NeuralMemoryState(NamedTuple):
    """Memory weights (leaves `[B, H, d_in, d_out]`) and momentum S (same leaves, or None)."""

    weights: Weights
    momentum: Weights | None


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
        output = x + layer_norm(z_last, self.norm_eps) if self.residual_norm else z_last
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


# --------------------------------------------------------- attentional bias (inner loss)


@dataclass(frozen=True)
class AttentionalBias:
    """Inner loss l(M; k, v) per token, and its gradient w.r.t. the memory output M(k)."""

    name: str
    loss: Callable[[jax.Array, jax.Array], jax.Array]  # (prediction, value) -> [..., t]
    output_grad: Callable[[jax.Array, jax.Array], jax.Array]  # -> like prediction


def l2_loss(prediction, value):
    """1/2 ||M(k) - v||^2. The 1/2 (absent in Titans eq. 12) makes theta the delta rule's beta."""
    return 0.5 * jnp.sum(jnp.square(prediction - value), axis=-1)


def l2_output_grad(prediction, value):
    return prediction - value


def dot_product_loss(prediction, value):
    """-<M(k), v>: with a matrix memory and GD this is (gated) linear attention."""
    return -jnp.sum(prediction * value, axis=-1)


def dot_product_output_grad(prediction, value):
    return jnp.broadcast_to(-value, prediction.shape)


ATTENTIONAL_BIASES = {
    "l2": AttentionalBias("l2", l2_loss, l2_output_grad),
    "dot_product": AttentionalBias("dot_product", dot_product_loss, dot_product_output_grad),
}


# ------------------------------------------------------------------------------ retention


@dataclass(frozen=True)
class Retention:
    """How the previous memory is kept before the update (Titans eq. 13's (1 - alpha_t))."""

    name: str
    retain: Callable  # (weights, log_decay [...]) -> weights, one token
    chunk_transfer: Callable  # log_decay [..., b] -> (Gamma [..., b], A [..., b, b])


def gated_decay_retain(weights, log_decay):
    """exp(g_t) M_{t-1} on every leaf: (1 - alpha_t) = exp(g_t), g_t <= 0."""
    factor = jnp.exp(log_decay)[..., None, None]
    return jax.tree.map(lambda w: factor * w, weights)


def gated_decay_chunk_transfer(log_decay):
    """Gamma_t = exp(sum_{m<=t} g_m) (from the chunk start) and A[t, j] = exp(sum_{m=j+1..t}
    g_m) for j <= t, else 0 (A[t, t] = 1), token indices counted within the chunk.

    A's sums come from a masked cumulative sum, not a difference of prefix sums, so no
    cancellation happens however strong the decay.
    """
    size = log_decay.shape[-1]
    strictly_below = jnp.tril(jnp.ones((size, size), bool), k=-1)  # [m, j]: m > j
    terms = jnp.where(strictly_below, log_decay[..., :, None], 0.0)
    sums = jnp.cumsum(terms, axis=-2)  # [t, j] = sum over j < m <= t
    causal = jnp.tril(jnp.ones((size, size), bool))
    transfer = jnp.where(causal, jnp.exp(jnp.where(causal, sums, 0.0)), 0.0)
    return jnp.exp(jnp.cumsum(log_decay, axis=-1)), transfer


RETENTIONS = {
    "gated_decay": Retention("gated_decay", gated_decay_retain, gated_decay_chunk_transfer),
}


# -------------------------------------------------------------------------- learning rule


class ChunkCoefficients(NamedTuple):
    """How the memory and momentum at token t of a chunk depend on the chunk's inputs.

    With w_i = -theta_i u_i (u_i the gradient at token i) and M0, S0 the chunk-start state:
        M_t = Gamma_t M0 + sum_{i<=t} update[t, i] w_i + carried[t] S0
        S_t = momentum_carried[t] S0 + sum_{i<=t} momentum_update[t, i] w_i
    Gamma_t comes from the retention; the last three are None for plain GD.
    """

    update: jax.Array  # [..., b, b], lower triangular
    carried: jax.Array | None  # [..., b]
    momentum_update: jax.Array | None  # [..., b, b]
    momentum_carried: jax.Array | None  # [..., b]


@dataclass(frozen=True)
class LearningRule:
    """The optimiser the memory runs on its inner loss (Titans eqs. 9-10, 13-14)."""

    name: str
    uses_momentum: bool
    token_update: Callable  # (momentum, grads, lr [...], eta [...]) -> (momentum, update)
    chunk_coefficients: Callable  # (transfer [..., b, b], eta [..., b]) -> ChunkCoefficients


def _per_token(scalar):
    return scalar[..., None, None]


def gradient_descent_update(momentum, grads, lr, eta):
    """One GD step: M_t = retained + (-theta_t u_t)."""
    del momentum, eta
    return None, jax.tree.map(lambda u: -_per_token(lr) * u, grads)


def gradient_descent_chunk(transfer, eta):
    del eta
    return ChunkCoefficients(transfer, None, None, None)


def momentum_update(momentum, grads, lr, eta):
    """Surprise with momentum, Titans eq. 10: S_t = eta_t S_{t-1} - theta_t u_t; M_t adds S_t."""
    new = jax.tree.map(lambda s, u: _per_token(eta) * s - _per_token(lr) * u, momentum, grads)
    return new, new


def momentum_chunk(transfer, eta):
    """C = A P and D = A E, with P[j, i] = prod_{m=i+1..j} eta_m (j >= i) and E_j = P[j, -1].

    M_t = Gamma_t M0 + sum_{j<=t} A[t, j] S_j and S_j = E_j S0 + sum_{i<=j} P[j, i] w_i.
    Products come from a masked cumulative product (no division), so eta = 0 is exact.
    """
    size = eta.shape[-1]
    strictly_below = jnp.tril(jnp.ones((size, size), bool), k=-1)  # [m, i]: m > i
    factors = jnp.where(strictly_below, eta[..., :, None], 1.0)
    causal = jnp.tril(jnp.ones((size, size), bool))
    momentum_update_coeff = jnp.where(causal, jnp.cumprod(factors, axis=-2), 0.0)
    momentum_carried = jnp.cumprod(eta, axis=-1)
    update = transfer @ momentum_update_coeff
    carried = jnp.einsum("...tj,...j->...t", transfer, momentum_carried)
    return ChunkCoefficients(update, carried, momentum_update_coeff, momentum_carried)


LEARNING_RULES = {
    "gd": LearningRule("gd", False, gradient_descent_update, gradient_descent_chunk),
    "momentum": LearningRule("momentum", True, momentum_update, momentum_chunk),
}


# ------------------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class MemorySpec:
    """The four choices by name (hashable, so it can be a static argument under jit).

    architecture: "matrix" (W: [Dk, Dv]) or "mlp" (needs Dk == Dv = D; `depth` layers, hidden
    width `expansion * D`, activation "gelu" (exact erf) or "silu", output x + LN(z_L) with a
    parameter-free LN, eps `norm_eps`). bias: "l2" or "dot_product". retention:
    "gated_decay". rule: "gd" or "momentum".
    """

    architecture: str = "mlp"
    depth: int = 2
    expansion: int = 2
    activation: str = "gelu"
    bias: str = "l2"
    retention: str = "gated_decay"
    rule: str = "momentum"
    norm_eps: float = 1e-6

    def __post_init__(self):
        for field, table in (
            ("architecture", {"matrix": None, "mlp": None}),
            ("activation", ACTIVATIONS),
            ("bias", ATTENTIONAL_BIASES),
            ("retention", RETENTIONS),
            ("rule", LEARNING_RULES),
        ):
            if getattr(self, field) not in table:
                raise ValueError(
                    f"MemorySpec.{field}={getattr(self, field)!r}; expected one of {list(table)}"
                )
        if self.depth < 1 or self.expansion < 1:
            raise ValueError(f"MemorySpec depth={self.depth}, expansion={self.expansion}: >= 1")

    @property
    def memory_architecture(self) -> MemoryArchitecture:
        if self.architecture == "matrix":
            return matrix_architecture()
        return mlp_architecture(self.depth, self.activation, self.norm_eps)

    @property
    def attentional_bias(self) -> AttentionalBias:
        return ATTENTIONAL_BIASES[self.bias]

    @property
    def retention_rule(self) -> Retention:
        return RETENTIONS[self.retention]

    @property
    def learning_rule(self) -> LearningRule:
        return LEARNING_RULES[self.rule]

    def weight_shapes(self, key_dim, value_dim) -> dict[str, tuple[int, int]]:
        """Per-head weight shapes `[d_in, d_out]`, keyed like the state's weight dict."""
        if self.architecture == "matrix":
            return {"W": (key_dim, value_dim)}
        if key_dim != value_dim:
            raise ValueError(f"mlp memory needs key_dim == value_dim, got {key_dim}, {value_dim}")
        widths = [key_dim] + [self.expansion * key_dim] * (self.depth - 1) + [key_dim]
        return {f"W{index + 1}": (widths[index], widths[index + 1]) for index in range(self.depth)}
