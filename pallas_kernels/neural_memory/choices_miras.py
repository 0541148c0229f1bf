"""The Miras / ATLAS choices beyond Titans, as plain functions registered in `choices.py`.

Miras = "It's All Connected" (Behrouz et al. 2025, arXiv 2504.13173); ATLAS = "Learning to
Optimally Memorize the Context at Test Time" (Behrouz et al. 2025, arXiv 2505.23735).

Attentional biases (per token, e = M(k) - v):
  lp     Moneta, Miras eqs. 10-11: (1/p) ||e||_p^p with |x| smoothed to sqrt(x^2 + eps)
         (Miras Remark on smooth approximations, eps = 1e-6). Departures: (i) the 1/p (the
         paper has no 1/p and a factor p in the gradient; like the 1/2 of our l2 it is
         absorbed into theta, and makes lp with p = 2 *equal* l2); (ii) we smooth the loss
         itself, (1/p) sum((e^2 + eps)^(p/2) - eps^(p/2)), and differentiate it, so the
         paper's Sign(x) ~ tanh(a x) becomes x / sqrt(x^2 + eps) (the derivative of the
         smoothed |x|). The gradient is e (e^2 + eps)^((p-2)/2): exactly e for p = 2.
  huber  Yaad, Miras eq. 26 (Yaad's update: the switch is on the l2 *norm* of the error, not
         per coordinate as the plain Huber of eq. 14; threshold delta_t > 0 per token):
         1/2 ||e||^2 if ||e||_2 <= delta_t, else delta_t ||e||_1 (gradient delta_t Sign(e),
         exact Sign as in the paper). Any delta_t >= ||e|| gives l2 exactly.
  huber_norm  the same switch with the Huber loss of the error's l2 norm outside it,
         delta_t (||e||_2 - delta_t / 2): gradient delta_t e / ||e||_2, which equals the
         quadratic branch's e at the switch. eq. 26's delta_t Sign(e) has norm
         delta_t sqrt(Dv) there, sqrt(Dv) times the l2 update, so a token that takes it
         writes past the l2 step's stability edge (`layers.neural_memory_init.default_lr_max`)
         -- measured: benchmarks/results/yaad_huber.md.

Retentions (the memory is stored as `stored`; the network runs on `effective(stored)`):
  lq     Moneta, Miras eq. 24: the state is an accumulator A_t = alpha_t A_{t-1} + U_t and
         the weights are W_t = A_t / ||A_t||_q^(q-2), per weight matrix and head (q = 4).
         Note ||W||_q = ||A||_q^(3-q): for q > 3 forgetting (A shrinking) grows W.
         Miras §5.4 trains Moneta with the normalisation at chunk boundaries only (inside a
         chunk A accumulates linearly): `lq_normaliser="chunk_start"` (see `MemorySpec`).
  kl     Memora, Miras eq. 27: W_t = c Softmax(alpha_t log W_{t-1} - eta_t grad). The state
         holds log-probabilities P_t = log_softmax(alpha_t P_{t-1} + U_t); W = c exp(P).
         The softmax runs over the input axis d_in of each [d_in, d_out] matrix (each output
         unit reads a c-scaled convex combination of its inputs); the paper says "per
         slice" without fixing the axis. Departure: c = kl_scale * sqrt(d_in) per matrix
         (the paper has c = 1), so that at uniform probabilities every column has unit
         norm, as a standard-initialised one. With c = 1 each column is an average of the
         input, the MLP memory's last pre-activation barely varies across features (std
         2.6e-3 at init against 8.6e-2 for Yaad's memory, head_dim 32) and its
         parameter-free LN amplifies what is left: Memora stalled at 3.34 nats/byte on
         text after 300 steps; with c ~ 6 (about sqrt(32)) it reached 1.59, with the other
         memories (benchmarks/results/model_comparison.md).
         Miras §5.4 trains Memora with a linearised chunk (eq. 27 only at the chunk's first
         "lag" token, additive steps after it): `kl_chunk_form="lag_token"` (`MemorySpec`).

Rule muon (ATLAS's "Atlas" update, the Omega rule optimised with Muon): the momentum is
S_t = eta_t S_{t-1} - u_t and the memory adds theta_t NS_k(S_t), Newton-Schulz with the
quintic coefficients (a, b, c) run k times on the Frobenius-normalised momentum (as Muon).
theta sits outside NS, as in ATLAS (M_t = alpha_t M_{t-1} - eta_t NS_k(S_t)), since NS
normalises the scale of S away; so S holds raw gradients here, unlike the "momentum" rule's
S (which includes theta).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory.memory_inputs import TokenInput

# ------------------------------------------------------------------------ attentional biases


def lp_loss(prediction, value, *, p, eps):
    """(1/p) sum_j [(e_j^2 + eps)^(p/2) - eps^(p/2)]: smooth (1/p) ||e||_p^p, 0 at e = 0."""
    squared = jnp.square(prediction - value) + eps
    return jnp.sum(jnp.power(squared, p / 2.0) - eps ** (p / 2.0), axis=-1) / p


def lp_output_grad(prediction, value, *, p, eps):
    """e (e^2 + eps)^((p-2)/2) = smooth Sign(e) |e|^(p-1); exactly e when p = 2."""
    error = prediction - value
    return error * jnp.power(jnp.square(error) + eps, (p - 2.0) / 2.0)


# Yaad's per-token threshold, an input the huber bias declares (`AttentionalBias.inputs`).
HUBER_DELTA = TokenInput("huber_delta", pad=1.0, empty=1.0)


def _inside_huber(error, threshold):
    """||e||_2 <= delta_t per token ([..., t]); the switch of Yaad eq. 26."""
    return jnp.sum(jnp.square(error), axis=-1) <= jnp.square(threshold)


def huber_loss(prediction, value, *, huber_delta):
    """Yaad eq. 26: 1/2 ||e||^2 inside the threshold, delta_t ||e||_1 outside.

    |e| is written e Sign(e) with Sign under stop_gradient, so `jax.grad` gives exactly
    delta_t Sign(e) (also at e_j = 0, where Sign = 0), as `huber_output_grad` does.
    """
    error = prediction - value
    l1 = jnp.sum(error * jax.lax.stop_gradient(jnp.sign(error)), axis=-1)
    l2 = 0.5 * jnp.sum(jnp.square(error), axis=-1)
    return jnp.where(_inside_huber(error, huber_delta), l2, huber_delta * l1)


def huber_output_grad(prediction, value, *, huber_delta):
    error = prediction - value
    inside = _inside_huber(error, huber_delta)[..., None]
    return jnp.where(inside, error, huber_delta[..., None] * jnp.sign(error))


def huber_norm_loss(prediction, value, *, huber_delta):
    """1/2 ||e||^2 inside the threshold, delta_t (||e||_2 - delta_t / 2) outside: continuous,
    with a continuous gradient (the Huber loss of ||e||_2)."""
    error = prediction - value
    squared = jnp.sum(jnp.square(error), axis=-1)
    inside = _inside_huber(error, huber_delta)
    norm = jnp.sqrt(jnp.where(inside, 1.0, squared))  # no sqrt(0) gradient inside
    return jnp.where(inside, 0.5 * squared, huber_delta * (norm - 0.5 * huber_delta))


def huber_norm_output_grad(prediction, value, *, huber_delta):
    error = prediction - value
    squared = jnp.sum(jnp.square(error), axis=-1, keepdims=True)
    inside = _inside_huber(error, huber_delta)[..., None]
    scale = huber_delta[..., None] * jax.lax.rsqrt(jnp.where(inside, 1.0, squared))
    return jnp.where(inside, error, scale * error)


# ------------------------------------------------------------------------------- retentions


def identity_weights(stored, spec):
    del spec
    return stored


def lq_effective_weights(stored, spec):
    """W = A / ||A||_q^(q-2) per leaf [..., d_in, d_out] (Miras eq. 24), q = spec.lq_q."""
    return jax.tree.map(lambda a, s: s * a, stored, lq_read_scale(stored, spec))


def lq_read_scale(stored, spec):
    """1 / ||A||_q^(q-2) per leaf, shaped [..., 1, 1]: W = scale x A.

    |A|^q is written (A^2)^(q/2) (smooth at 0); `lq_eps` inside the sum keeps the power
    finite for an all-zero accumulator. q = 2 is the identity exactly (power 0). With
    `lq_normaliser="chunk_start"` a chunk reads every token's A_t with its chunk-start
    accumulator's scale (Miras §5.4, see `MemorySpec`).
    """
    q = spec.lq_q

    def scale(accumulator):
        power_sum = jnp.sum(jnp.power(jnp.square(accumulator), q / 2.0), axis=(-2, -1))
        return 1.0 / jnp.power(power_sum + spec.lq_eps, (q - 2.0) / q)[..., None, None]

    return jax.tree.map(scale, stored)


def kl_effective_weights(stored, spec):
    """W = c softmax(P) over d_in (axis -2), c = kl_scale sqrt(d_in): Memora's weights from
    its log-probabilities (module doc)."""

    def weights(logits):
        scale = spec.kl_scale * logits.shape[-2] ** 0.5
        return scale * jax.nn.softmax(logits, axis=-2)

    return jax.tree.map(weights, stored)


# Memora's parallel form (`chunked_lag_token`) maps additive weights back to probabilities;
# an entry the additive steps left at or below this probability is held at it.
KL_PROBABILITY_FLOOR = 1e-6


def kl_logits_from_weights(weights, spec):
    """P = log_softmax(log max(W / c, floor)) over d_in: log-probabilities whose
    `kl_effective_weights` are W wherever W / c is a column of probabilities above the floor
    (the inverse of the weights map, Miras eq. 32's return to the simplex)."""

    def logits(w):
        scale = spec.kl_scale * w.shape[-2] ** 0.5
        floored = jnp.maximum(w / scale, KL_PROBABILITY_FLOOR)
        return jax.nn.log_softmax(jnp.log(floored), axis=-2)

    return jax.tree.map(logits, weights)


def kl_after_update(stored):
    """P_t = log_softmax(alpha_t P_{t-1} + U_t) (Miras eq. 27 in log space).

    Softmax is invariant to a shift of each column, so normalising only changes what is
    stored, never W; it keeps the log-probabilities bounded over long sequences.
    """
    return jax.tree.map(lambda logits: jax.nn.log_softmax(logits, axis=-2), stored)


def no_after_update(stored):
    return stored


# ------------------------------------------------------------------------------ muon rule


def newton_schulz(matrix, steps, coefficients, eps=1e-7):
    """NS_k(X) of the Atlas update on the last two axes: X / ||X||_F, then k times
    X <- a X + (b A + c A A) X with A = X X^T, on the wide orientation (rows <= cols).

    Same iteration as `optim.newton_schulz` (Muon's quintic), but in the input's float
    precision and with configurable coefficients. The norm is sqrt(||X||^2 + eps^2), which
    is smooth at X = 0 (a zero momentum stays zero, with finite gradients).
    """
    a, b, c = coefficients
    transposed = matrix.shape[-2] > matrix.shape[-1]
    x = jnp.swapaxes(matrix, -1, -2) if transposed else matrix
    norm_sq = jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)
    x = x * jax.lax.rsqrt(norm_sq + eps * eps)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return jnp.swapaxes(x, -1, -2) if transposed else x


def muon_update_from_momentum(momentum, lr, *, steps, coefficients):
    """theta_t NS_k(S_t) on every leaf; any leading dims (one token, or a chunk's b tokens)."""
    return jax.tree.map(
        lambda s: lr[..., None, None] * newton_schulz(s, steps, coefficients), momentum
    )


def muon_update(momentum, grads, lr, eta, *, steps, coefficients):
    """ATLAS's Muon rule: S_t = eta_t S_{t-1} - u_t; the memory adds theta_t NS_k(S_t)."""
    new = jax.tree.map(lambda s, u: eta[..., None, None] * s - u, momentum, grads)
    return new, muon_update_from_momentum(new, lr, steps=steps, coefficients=coefficients)


# ---------------------------------------------------------------------- the Omega window


# ATLAS eq. 9's gamma_t, declared by a spec with omega_window > 1 (absent: all ones).
OMEGA_GATE = TokenInput("omega_gate", pad=0.0, empty=0.0, required=False)
OMEGA_GATE_KINDS = ("token", "pair")
PAIR_GATE_PREFIX = "omega_pair_gate_"


def omega_gate_inputs(kind, size):
    """The gate inputs of an Omega window of `size` tokens: `OMEGA_GATE` (kind "token"), or
    for kind "pair" eq. 9's gamma_i^(t) as `size` per-token inputs: token t's gate for slot
    j of its window (token t - size + 1 + j, oldest first). The pair gates are the reading
    token's, so the window never stores them (their `empty` value is never read)."""
    if kind == "token":
        return (OMEGA_GATE,)
    return tuple(
        TokenInput(f"{PAIR_GATE_PREFIX}{slot}", pad=0.0, empty=0.0, required=False)
        for slot in range(size)
    )


def with_pair_gates(spec, gates, inputs):
    """`gates` (the window slots' own gamma_i, each token's c slots last, oldest first, flat
    or not) times each token's pair gates for its slots, where the spec has pair gates and
    the call passed them; otherwise `gates` as they are."""
    if spec.omega_gates != "pair" or f"{PAIR_GATE_PREFIX}0" not in inputs.extra:
        return gates
    names = [f"{PAIR_GATE_PREFIX}{slot}" for slot in range(spec.omega_window)]
    missing = [name for name in names if name not in inputs.extra]
    if missing:
        raise ValueError(f"omega_gates='pair' takes all {len(names)} pair gates or none; "
                         f"missing {missing}")  # fmt: skip
    per_pair = jnp.stack([inputs.extra[name] for name in names], axis=-1)  # [..., c]
    return gates * per_pair.reshape(gates.shape)


def window_tokens(spec, inputs):
    """What the Omega window keeps of each token (a `MemoryInputs`, any layout): its key,
    value, gate (ones when the omega_gate input is absent) and the inputs the bias declares."""
    gate = inputs.extra.get("omega_gate")
    gate = jnp.ones_like(inputs.lr) if gate is None else gate
    tokens = {"k": inputs.k, "v": inputs.v, "gate": gate}
    tokens.update({item.name: inputs.extra[item.name] for item in spec.attentional_bias.inputs})
    return tokens


def empty_window(spec, batch, heads, key_dim, value_dim, dtype=jnp.float32):
    """The Omega window before the first token: c-1 zero tokens with gate 0 (they add
    nothing), and the bias's inputs at their `TokenInput.empty` values (Huber's threshold
    1: any positive value would do). None when c == 1."""
    size = spec.omega_window - 1
    if size == 0:
        return None
    window = {
        "k": jnp.zeros((batch, heads, size, key_dim), dtype),
        "v": jnp.zeros((batch, heads, size, value_dim), dtype),
        "gate": jnp.zeros((batch, heads, size), dtype),
    }
    for item in spec.attentional_bias.inputs:
        window[item.name] = jnp.full((batch, heads, size), item.empty, dtype)
    return window
