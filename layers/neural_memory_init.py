"""What the deep memory layer (`layers.neural_memory`) starts from: its gate biases, the
cap on its inner step size θ (`default_lr_max`, the inner step's stability edge), and its
initial memory weights.

Each value is a measured choice, and the comments say what went wrong without it
(benchmarks/results/gradient_scale.md, moneta_step.md).
"""

import math

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory import MemorySpec

# Gate biases at init: θ = lr_max / 2, η = 1/2, α = sigmoid(-4) ≈ 0.018 (the memory keeps
# ~98% per token, a half-life of ~38 tokens; sigmoid(0) = 1/2 would forget almost at once).
STEP_SIZE_BIAS_INIT = 0.0
MOMENTUM_BIAS_INIT = 0.0
DECAY_BIAS_INIT = -4.0
# The MLP memory's output x + LN(z_L) has, at init, curvature ≈ fan_in(W_L) along its last
# layer (LN divides by σ(z_L) ≈ ‖h‖ / sqrt(fan_in)): a gradient step θ u on one pair moves the
# output by ~θ fan_in times the error. Past the step's stability edge it overshoots -- on the
# LN's sphere it can land opposite the target, a point the gradient cannot leave (trained MAL,
# text seed 1: a run of spaces at θ = 0.1, error ‖LN‖ + ‖v‖, outer gradients 10^2-10^4 all
# run long, benchmarks/results/gradient_scale.md). `default_lr_max` puts the cap at that
# edge. The Muon rule's step θ NS(S) has a fixed size and the KL retention stores
# log-probabilities, so they keep the earlier cap.
DEFAULT_LR_MAX = 0.1


def default_lr_max(spec: MemorySpec, key_dim: int, value_dim: int) -> float:
    """θ's cap when none is given: the inner step's stability edge at init for an MLP memory
    with a gd / momentum rule, gated decay or ℓq retention, and an l2, Huber or ℓp (p >= 2)
    bias; DEFAULT_LR_MAX for the other memories (below p = 2 the ℓp step no longer shrinks
    with the error, as Yaad's Sign step, and the quadratic's edge does not apply).

    One (k, v) pair written over and over (a run of one byte) is a quadratic of curvature
    L = fan_in of the last layer. Each token steps θ times the gradients of the Omega window's
    c tokens, each weighted by its gate γ (Σγ = c / 2 at init; 1 without a window), and
    momentum carries every step 1 / (1 - η) times over (η = 1/2 at init). Gradient descent on
    the quadratic is stable while θ Σγ L / (1 - η) < 2; the cap is that edge, and θ starts
    (at lr_max / 2) at the one-step write, θ Σγ L / (1 - η) = 1 -- as β = 1 for the delta rule
    on unit keys. Measured (benchmarks/results/gradient_scale.md): MAL (momentum) at twice its
    cap ends text seed 1 at 2.136 bits/byte against 1.802; Yaad (gd) at half its cap recalled
    MQAR seed 0 at 92.3% after 1,000 steps against 99.7%.

    Moneta's choices scale L (`_lq_step_gain`, `_bias_curvature`): its ℓq retention steps the
    accumulator A by θ times the gradient in W = A / ||A||_q^(q-2), which is ||A||_q^(q-2)
    times the gradient in A, and its ℓp bias has curvature (p - 1) |e|^(p-2) per coordinate.
    With the cap of the l2 memories (0.1) Moneta ran 3-6x past its edge, and it
    learned neither MQAR (1.3%) nor text (benchmarks/results/moneta_step.md).
    """
    covered = (
        spec.architecture == "mlp"
        and (spec.bias in ("l2", "huber", "huber_norm") or (spec.bias == "lp" and spec.lp_p >= 2))
        and spec.retention in ("gated_decay", "lq")
        and spec.rule in ("gd", "momentum")
    )
    if not covered:
        return DEFAULT_LR_MAX
    last_shape = list(spec.weight_shapes(key_dim, value_dim).values())[-1]
    curvature = last_shape[0] * _lq_step_gain(spec, last_shape) * _bias_curvature(spec)
    window = 1.0
    if spec.omega_window > 1:
        window = spec.omega_window * _sigmoid(OMEGA_GATE_BIAS_INIT)
    carried = 1.0
    if spec.learning_rule.uses_momentum:
        carried = 1.0 / (1.0 - _sigmoid(MOMENTUM_BIAS_INIT))
    return 2.0 / (curvature * window * carried)


def _lq_step_gain(spec: MemorySpec, shape: tuple[int, int]) -> float:
    """||A_0||_q^(q-2) for ℓq retention (1 otherwise), A_0 [d_in, d_out] ~ N(0, 1/d_in) as
    `memory_weight_init` draws it: the factor by which a step of θ times the W-gradient is
    longer than θ times the A-gradient. The output LN makes the last layer's function of A
    scale-free, so its curvature in A is fan_in and this gain is what the step adds.
    E||A||_q^q = d_in d_out E|z|^q σ^q, z ~ N(0, 1), σ = d_in^(-1/2)."""
    if spec.retention != "lq":
        return 1.0
    q = spec.lq_q
    d_in, d_out = shape
    power_sum = d_in * d_out * _normal_absolute_moment(q) * d_in ** (-q / 2.0)
    return power_sum ** ((q - 2.0) / q)


def _bias_curvature(spec: MemorySpec) -> float:
    """The attentional bias's second derivative per error coordinate, E over e ~ N(0, 1) (the
    scale of the output LN's coordinates at init): 1 for l2 and Huber inside δ; for ℓp,
    (p - 1) E|e|^(p-2) (1.60 at p = 3)."""
    if spec.bias != "lp":
        return 1.0
    return (spec.lp_p - 1.0) * _normal_absolute_moment(spec.lp_p - 2.0)


def _normal_absolute_moment(order: float) -> float:
    """E|z|^order for z ~ N(0, 1): 2^(order/2) Γ((order + 1) / 2) / sqrt(π)."""
    return 2.0 ** (order / 2.0) * math.gamma((order + 1.0) / 2.0) / math.sqrt(math.pi)


def _sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit))


# The per-token gates' kernels (θ, η, α and the declared extras) start at zero, so every token
# starts at the bias values above and the gates learn their dependence on x. At the width-aware
# init_std the logits varied with std ~1 across tokens: a byte-level space got α ≈ 0.125, and a
# run of 16 spaces (Python indentation) shrank the memory's weights 10x in one row while its
# gradient, tangent to the output LN's scale-invariant direction, could not restore them. The
# LN's gain grows as the weights shrink, so the first text gradients were 10^2-10^5
# (benchmarks/results/gradient_scale.md); with zero kernels, 5-20x smaller.
GATE_INIT_STD = 0.0
# Huber threshold δ = softplus(b) = 2 sqrt(head_dim) at init (`huber_bias_init`). An error
# ‖M(k) - v‖ at init is about sqrt(head_dim) (the memory's output LN part), so Yaad starts in
# the quadratic (l2) regime and only errors twice the typical size take the linear branch.
# At δ = sqrt(head_dim) many tokens took it, and the paper's linear branch δ Sign(e)
# (norm δ sqrt(d), sqrt(d) times the l2 update at the switch) gives the value projection no
# gradient: 300 steps of configs/default.py ended at 3.15 nats/byte, against 1.48 at
# 2 sqrt(head_dim). δ only learns from tokens in the linear regime. The floor keeps δ > 0
# when softplus underflows. (Yaad's default linear branch is now δ e / ‖e‖, "huber_norm",
# whose update is never longer than the l2 one: models.miras.)
HUBER_DELTA_INIT_SCALE = 2.0
HUBER_DELTA_MIN = 1e-4
# Omega gates γ = sigmoid(0) = 1/2 at init: every token of the window counts the same.
OMEGA_GATE_BIAS_INIT = 0.0


def huber_bias_init(head_dim: int) -> float:
    """softplus^-1(δ_0) = log(exp(δ_0) - 1), δ_0 = HUBER_DELTA_INIT_SCALE sqrt(head_dim)."""
    return math.log(math.expm1(HUBER_DELTA_INIT_SCALE * math.sqrt(head_dim)))


def memory_weight_init(key, shape, dtype=jnp.float32):
    """N(0, 1/d_in) per head: M_0(x) keeps the scale of x ([H, d_in, d_out])."""
    return jax.random.normal(key, shape, dtype) * shape[-2] ** -0.5


def log_probability_init(key, shape, dtype=jnp.float32):
    """N(0, 1) log-probabilities for KL retention (Memora), whose weights are softmax(P)
    over d_in: with N(0, 1/d_in) the softmax is nearly uniform, every output unit starts as
    the same average of its inputs, and the memory's parameter-free LN divides by their
    tiny spread (float32 rounding grows ~10x, measured). Unit spread gives distinct units."""
    return jax.random.normal(key, shape, dtype)
