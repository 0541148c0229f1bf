"""The four Miras choices of a deep memory, as small named pieces composed by `MemorySpec`.

Miras ("It's All Connected", 2025) writes every test-time memory as (architecture, attentional
bias, retention, learning rule); Titans (Behrouz et al. 2024, eqs. 8-18) is one point:
MLP memory, l2 bias, gated decay, GD + momentum. Each choice below is a frozen dataclass of
plain functions, looked up by name, so a new bias or rule is one new entry, not a new branch
in every implementation.

Shapes: tokens are `[..., t, d]` (leading batch/head dims), weights `[..., d_in, d_out]`
(Flax `[in, out]` layout, so a layer computes `x @ W`), per-token scalars `[..., t]`.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optim.newton_schulz import QUINTIC_COEFFICIENTS
from pallas_kernels.neural_memory import choices_miras as miras
from pallas_kernels.neural_memory.choices_architecture import (  # noqa: F401 (re-exported)
    ACTIVATIONS,
    Activation,
    MemoryArchitecture,
    gelu,
    gelu_derivative,
    layer_norm,
    layer_norm_vjp,
    matrix_architecture,
    mlp_architecture,
    silu,
    silu_derivative,
)
from pallas_kernels.neural_memory.memory_inputs import TokenInput

Weights = dict[str, jax.Array]


def at_least_float32(x):
    """Compute dtype: bfloat16/float16 -> float32; float64 (under jax x64) stays float64."""
    return None if x is None else x.astype(jnp.promote_types(x.dtype, jnp.float32))


class NeuralMemoryState(NamedTuple):
    """Everything the recurrence carries from one token (or chunk) to the next.

    weights: the stored memory, leaves `[B, H, d_in, d_out]`: the weights themselves for
      gated_decay, the accumulator A for lq, log-probabilities for kl (the network runs on
      `MemorySpec.effective_weights(weights)`). momentum: S (same leaves) or None for GD.
    window: the Omega rule's last c-1 tokens (None when omega_window == 1): {"k" [B, H, c-1,
      Dk], "v" [B, H, c-1, Dv], "gate" [B, H, c-1], and "huber_delta" [B, H, c-1] for the
      huber bias}, oldest first; before the sequence starts they are zeros with gate 0.
    """

    weights: Weights
    momentum: Weights | None
    window: dict | None = None


# --------------------------------------------------------- attentional bias (inner loss)


@dataclass(frozen=True)
class AttentionalBias:
    """Inner loss l(M; k, v) per token, and its gradient w.r.t. the memory output M(k).

    Both take (prediction [..., t, d], value [..., t, d]) and, as keyword arguments, the
    per-token inputs [..., t] the bias declares in `inputs` (Huber's huber_delta): the
    recurrence hands every declared input to the loss of each token it scores, including the
    tokens of an Omega window. `options(spec)` gives the keyword arguments the spec fixes
    (lp's p and eps); `MemorySpec.attentional_bias` binds them.
    """

    name: str
    loss: Callable  # -> [..., t]
    output_grad: Callable  # -> like prediction
    inputs: tuple[TokenInput, ...] = ()
    options: Callable | None = None


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
    "lp": AttentionalBias(
        "lp",
        miras.lp_loss,
        miras.lp_output_grad,
        options=lambda spec: {"p": spec.lp_p, "eps": spec.lp_eps},
    ),
    "huber": AttentionalBias(
        "huber", miras.huber_loss, miras.huber_output_grad, inputs=(miras.HUBER_DELTA,)
    ),
    "huber_norm": AttentionalBias(
        "huber_norm",
        miras.huber_norm_loss,
        miras.huber_norm_output_grad,
        inputs=(miras.HUBER_DELTA,),
    ),
}


# ------------------------------------------------------------------------------ retention


@dataclass(frozen=True)
class Retention:
    """How the previous memory is kept before the update (Titans eq. 13's (1 - alpha_t)).

    Every retention here keeps exp(g_t) x stored (`retain`) and adds the rule's update; they
    differ in what is stored and how the network reads it:
      effective_weights(stored, spec): the weights M(.) runs on (identity for gated_decay);
      after_update(stored): a projection after adding the update that must leave
        effective_weights unchanged (kl's log_softmax, a per-column shift under softmax),
        so a chunk form may apply it only at the chunk end;
      gradient_at_retained: True: u_t at exp(g_t) M_{t-1} (gated_decay, as Gated DeltaNet);
        False: at the previous weights W_{t-1} = effective(stored_{t-1}) (lq, kl: the
        papers' eqs. 24 and 27). In a chunk the former becomes Gamma_t M_{c0} (decayed
        chunk-start memory), the latter W_{c0}.
      linear: the network reads the stored memory itself (only gated_decay), so the chunk
        runs in `chunked.chunk_step`'s attention-like form without materialising per-token
        weights; otherwise `chunked_materialised` runs it.
      read_scale(stored, spec): for a retention whose weights are a per-leaf scalar times
        the stored state (lq: 1 / ||A||_q^(q-2)), that scalar [..., 1, 1]; with it frozen
        at the chunk start (`MemorySpec.lq_normaliser="chunk_start"`) the chunk is linear.
    """

    name: str
    retain: Callable  # (weights, log_decay [...]) -> weights, one token
    chunk_transfer: Callable  # log_decay [..., b] -> (Gamma [..., b], A [..., b, b])
    effective_weights: Callable = miras.identity_weights
    after_update: Callable = miras.no_after_update
    gradient_at_retained: bool = True
    linear: bool = True
    read_scale: Callable | None = None


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
    # Moneta (Miras eq. 24): A_t = alpha_t A_{t-1} + U_t, W_t = A_t / ||A_t||_q^(q-2).
    "lq": Retention(
        "lq",
        gated_decay_retain,
        gated_decay_chunk_transfer,
        miras.lq_effective_weights,
        gradient_at_retained=False,
        linear=False,
        read_scale=miras.lq_read_scale,
    ),
    # Memora (Miras eq. 27): P_t = log_softmax(alpha_t P_{t-1} + U_t), W_t = c exp(P_t).
    "kl": Retention(
        "kl",
        gated_decay_retain,
        gated_decay_chunk_transfer,
        miras.kl_effective_weights,
        miras.kl_after_update,
        gradient_at_retained=False,
        linear=False,
    ),
}


LQ_NORMALISERS = ("token", "chunk_start")  # `MemorySpec.lq_normaliser`
KL_CHUNK_FORMS = ("exact", "lag_token")  # `MemorySpec.kl_chunk_form`


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
    """The optimiser the memory runs on its inner loss (Titans eqs. 9-10, 13-14; ATLAS).

    chunk_coefficients is None for a rule that is not linear in the gradients (muon); such
    a rule runs in `chunked_materialised`. There, `update_from_momentum` (momentum leaves
    [..., b, m, n], lr [..., b]) -> update leaves, given for a rule whose momentum is linear
    in the raw gradients (S_t = eta_t S_{t-1} - u_t) and whose update is a per-token map of
    S_t (muon's theta_t NS(S_t)), lets a chunk with linear retention run without a per-token
    scan. `options(spec)` as for `AttentionalBias`.
    """

    name: str
    uses_momentum: bool
    token_update: Callable  # (momentum, grads, lr [...], eta [...]) -> (momentum, update)
    chunk_coefficients: Callable | None  # (transfer [..., b, b], eta [..., b]) -> Coefficients
    options: Callable | None = None
    update_from_momentum: Callable | None = None


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


def momentum_transfer(eta):
    """P[j, i] = prod_{m=i+1..j} eta_m (j >= i, else 0) and E_j = prod_{m<=j} eta_m: the
    momentum S_j = eta_j S_{j-1} + w_j of a chunk is E_j S0 + sum_{i<=j} P[j, i] w_i.
    Products come from a masked cumulative product (no division), so eta = 0 is exact."""
    size = eta.shape[-1]
    strictly_below = jnp.tril(jnp.ones((size, size), bool), k=-1)  # [m, i]: m > i
    factors = jnp.where(strictly_below, eta[..., :, None], 1.0)
    causal = jnp.tril(jnp.ones((size, size), bool))
    return jnp.where(causal, jnp.cumprod(factors, axis=-2), 0.0), jnp.cumprod(eta, axis=-1)


def momentum_chunk(transfer, eta):
    """C = A P and D = A E, with P and E from `momentum_transfer`.

    M_t = Gamma_t M0 + sum_{j<=t} A[t, j] S_j and S_j = E_j S0 + sum_{i<=j} P[j, i] w_i.
    """
    momentum_update_coeff, momentum_carried = momentum_transfer(eta)
    update = transfer @ momentum_update_coeff
    carried = jnp.einsum("...tj,...j->...t", transfer, momentum_carried)
    return ChunkCoefficients(update, carried, momentum_update_coeff, momentum_carried)


LEARNING_RULES = {
    "gd": LearningRule("gd", False, gradient_descent_update, gradient_descent_chunk),
    "momentum": LearningRule("momentum", True, momentum_update, momentum_chunk),
    "muon": LearningRule(
        "muon",
        True,
        miras.muon_update,
        None,
        options=lambda spec: {"steps": spec.ns_steps, "coefficients": spec.ns_coefficients},
        update_from_momentum=miras.muon_update_from_momentum,
    ),
}


def _bind(entry, spec, *function_fields):
    """The table entry with the spec's options (lp's p, muon's NS steps) bound in."""
    if entry.options is None:
        return entry
    options = entry.options(spec)
    bound = {field: partial(getattr(entry, field), **options) for field in function_fields}
    return replace(entry, **bound)


# ------------------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class MemorySpec:
    """The four choices by name (hashable, so it can be a static argument under jit).

    architecture: "matrix" (W: [Dk, Dv]) or "mlp" (needs Dk >= Dv; `depth` layers, hidden
    width `expansion * Dv`, activation "gelu" (exact erf) or "silu", output x[:Dv] + LN(z_L)
    with a parameter-free LN, eps `norm_eps`).
    bias: "l2", "dot_product", "lp" (Moneta; `lp_p`, smoothing `lp_eps`) or "huber" (Yaad;
      declares the per-token `huber_delta` input; "huber_norm": its linear branch on the
      error's l2 norm). See `choices_miras`.
    retention: "gated_decay", "lq" (Moneta; `lq_q`, `lq_eps` keeps the norm finite at 0) or
      "kl" (Memora; weights `kl_scale` x sqrt(d_in) x softmax).
    lq_normaliser: where lq's W = A / ||A||_q^(q-2) takes its norm in the chunk-parallel
      form. "token": every token's own A_t (eq. 24; the chunk materialises per-token
      weights). "chunk_start": Miras §5.4's parallel form, normalisation at chunk
      boundaries only -- token t of a chunk reads A_t / ||A_{c0}||_q^(q-2), A_{c0} the
      chunk-start accumulator, so the chunk runs in the linear attention-like form at the
      Titans LMM's cost. A parallel-training approximation (chunk size 1 reads with the
      previous token's norm); the token references (`exact_scan`, `step`) keep eq. 24.
    kl_chunk_form: how a chunk runs kl retention (rule "gd"). "exact": eq. 27 at every token
      (softmax and log per token; the chunk materialises per-token weights). "lag_token":
      Miras §5.4's parallel form (`chunked_lag_token`): the chunk's first token takes eq. 27,
      the rest add GD steps to its weights W_1 in weight space (gradients at W_1), linear
      like the Titans chunk; the chunk-end weights return to log-probabilities. Chunk size
      1 is eq. 27 exactly; the token references (`exact_scan`, `step`) keep eq. 27.
    rule: "gd", "momentum" or "muon" (ATLAS; `ns_steps` Newton-Schulz steps with
      `ns_coefficients` (a, b, c)).
    omega_window: ATLAS eq. 9's c: the update at t uses the gradient of
      sum_{i=t-c+1..t} gamma_i^(t) l(M; k_i, v_i); c = 1 is the online rule.
    omega_gates: how gamma_i^(t) is given (omega_window > 1). "token": one gate per token,
      gamma_i^(t) = gamma_i (the `omega_gate` input, default 1), whatever step reads it;
      "pair": eq. 9 as written, a gate per (t, i) pair: token t brings c gates, one per slot
      of its window (inputs `omega_pair_gate_0` .. `_{c-1}`, oldest slot first, default 1).
    """

    architecture: str = "mlp"
    depth: int = 2
    expansion: int = 2
    activation: str = "gelu"
    bias: str = "l2"
    retention: str = "gated_decay"
    rule: str = "momentum"
    norm_eps: float = 1e-6
    lp_p: float = 3.0
    lp_eps: float = 1e-6
    lq_q: float = 4.0
    lq_eps: float = 1e-12
    lq_normaliser: str = "token"
    kl_chunk_form: str = "exact"
    kl_scale: float = 1.0
    ns_steps: int = 5
    ns_coefficients: tuple[float, float, float] = QUINTIC_COEFFICIENTS  # Muon's
    omega_window: int = 1
    omega_gates: str = "token"

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
        for field, valid, wanted in (
            ("lp_p", self.lp_p >= 1.0, ">= 1"),
            ("lp_eps", self.lp_eps > 0.0, "> 0"),
            ("lq_q", self.lq_q > 1.0, "> 1"),
            ("lq_eps", self.lq_eps >= 0.0, ">= 0"),
            ("kl_scale", self.kl_scale > 0.0, "> 0"),
            ("ns_steps", isinstance(self.ns_steps, int) and self.ns_steps >= 0, "an int >= 0"),
            ("ns_coefficients", len(tuple(self.ns_coefficients)) == 3, "3 numbers (a, b, c)"),
            ("omega_window", isinstance(self.omega_window, int) and self.omega_window >= 1,
             "an int >= 1"),
        ):  # fmt: skip
            if not valid:
                raise ValueError(f"MemorySpec.{field}={getattr(self, field)!r}; expected {wanted}")
        if self.lq_normaliser not in LQ_NORMALISERS:
            raise ValueError(f"MemorySpec.lq_normaliser={self.lq_normaliser!r}; expected one "
                             f"of {list(LQ_NORMALISERS)}")  # fmt: skip
        if self.kl_chunk_form not in KL_CHUNK_FORMS:
            raise ValueError(f"MemorySpec.kl_chunk_form={self.kl_chunk_form!r}; expected one "
                             f"of {list(KL_CHUNK_FORMS)}")  # fmt: skip
        if self.lag_token_chunk and self.rule != "gd":
            raise ValueError(f"MemorySpec.kl_chunk_form='lag_token' with rule={self.rule!r}; "
                             "expected rule 'gd' (Miras §5.4's Memora chunk)")  # fmt: skip
        if self.omega_gates not in miras.OMEGA_GATE_KINDS:
            raise ValueError(f"MemorySpec.omega_gates={self.omega_gates!r}; expected one of "
                             f"{list(miras.OMEGA_GATE_KINDS)}")  # fmt: skip
        if self.omega_gates == "pair" and self.omega_window == 1:
            raise ValueError("MemorySpec.omega_gates='pair'; expected omega_window > 1 (a "
                             "window of one token has one gate per token)")  # fmt: skip

    @property
    def memory_architecture(self) -> MemoryArchitecture:
        if self.architecture == "matrix":
            return matrix_architecture()
        return mlp_architecture(self.depth, self.activation, self.norm_eps)

    @property
    def attentional_bias(self) -> AttentionalBias:
        return _bind(ATTENTIONAL_BIASES[self.bias], self, "loss", "output_grad")

    @property
    def retention_rule(self) -> Retention:
        return RETENTIONS[self.retention]

    @property
    def learning_rule(self) -> LearningRule:
        rule = LEARNING_RULES[self.rule]
        if rule.update_from_momentum is None:
            return _bind(rule, self, "token_update")
        return _bind(rule, self, "token_update", "update_from_momentum")

    @property
    def chunk_read_scale(self) -> Callable | None:
        """(stored, spec) -> per-leaf scale a chunk reads with, frozen at the chunk start
        (lq with lq_normaliser="chunk_start"); None: the chunk reads effective weights."""
        if self.retention == "lq" and self.lq_normaliser == "chunk_start":
            return self.retention_rule.read_scale
        return None

    @property
    def lag_token_chunk(self) -> bool:
        """kl retention in Miras §5.4's linearised chunk (`chunked_lag_token`)."""
        return self.retention == "kl" and self.kl_chunk_form == "lag_token"

    @property
    def linear_in_chunk(self) -> bool:
        """True when `chunked.chunk_step`'s attention-like linear form applies (Titans eqs.
        16-18): a linear retention (gated_decay, or lq read with its chunk-start scale) and
        a rule with chunk coefficients (gd, momentum); kl's lag-token chunk is linear after
        its first token."""
        linear = self.retention_rule.linear or self.chunk_read_scale is not None
        linear = linear or self.lag_token_chunk
        return linear and self.learning_rule.chunk_coefficients is not None

    @property
    def extra_inputs(self) -> tuple[TokenInput, ...]:
        """The per-token inputs beyond q, k, v, lr, momentum, log_decay that these choices
        declare (`MemoryInputs.extra`): the bias's, and the Omega gate(s) for omega_window > 1
        (one per token, or c per token with omega_gates="pair")."""
        omega = ()
        if self.omega_window > 1:
            omega = miras.omega_gate_inputs(self.omega_gates, self.omega_window)
        return ATTENTIONAL_BIASES[self.bias].inputs + omega

    def effective_weights(self, stored):
        """The weights the memory network runs on, from the stored state (see `Retention`)."""
        return self.retention_rule.effective_weights(stored, self)

    def weight_shapes(self, key_dim, value_dim) -> dict[str, tuple[int, int]]:
        """Per-head weight shapes `[d_in, d_out]`, keyed like the state's weight dict."""
        if self.architecture == "matrix":
            return {"W": (key_dim, value_dim)}
        if key_dim < value_dim:
            raise ValueError(f"mlp memory needs key_dim >= value_dim, got {key_dim}, {value_dim}")
        # Hidden width from Dv: with Dk = Dv as before; with keys through the monomial map
        # (Dk ~ d^p) the first layer alone carries the Dk-sized weight.
        widths = [key_dim] + [self.expansion * value_dim] * (self.depth - 1) + [value_dim]
        return {f"W{index + 1}": (widths[index], widths[index + 1]) for index in range(self.depth)}
