"""The neural (deep) long-term memory layer of Titans (Behrouz et al. 2024, §3.1-3.2).

Around the recurrence of `pallas_kernels.neural_memory` (Titans eqs. 8-18 in the Miras
four-choice form; see its `reference.py`):

    q, k, v = SiLU(ShortConv(x W_q)), SiLU(ShortConv(x W_k)), SiLU(ShortConv(x W_v))
    q, k    = q / ‖q‖, k / ‖k‖                          (per head; Titans §4.4)
    θ_t     = lr_max · sigmoid(x_t W_θ + b_θ)           (inner step size, eq. 13)
    η_t     = sigmoid(x_t W_η + b_η)                    (momentum, eq. 10)
    α_t     = sigmoid(x_t W_α + b_α),  g_t = log(1 − α_t) = −softplus(x_t W_α + b_α) ≤ 0
    o_t     = M_t(q_t)                                  (read after the update, eq. 15)
    y       = (RMSNorm(o) ⊙ SiLU(x W_gate)) W_out       (per-head norm + output gate)

and, only where the `MemorySpec` / options ask for them (ATLAS, Miras):

    q, k    = φ(q), φ(k)                                (feature map after the ℓ2 norm;
                                                         `layers.feature_maps`, ATLAS §3.1)
    δ_t     = softplus(x_t W_δ + b_δ) + δ_min            (Huber threshold, biases "huber",
                                                         "huber_norm":
                                                         Yaad's data-dependent δ_t, Miras §5)
    γ_t     = sigmoid(x_t W_γ + b_γ)                    (Omega-rule gate, omega_window > 1:
                                                         ATLAS eq. 9's γ_i)
    γ_t^j   = sigmoid(x_t W_γj + b_γj), j < c            (omega_gates="pair": eq. 9's γ_i^(t),
                                                         token t's gate for window slot j)

The choices themselves (ℓp / Huber bias, ℓq / KL retention, Muon and Omega rules) live in
`pallas_kernels.neural_memory`; the layer only produces their per-token inputs, as one
`MemoryInputs` record: the inputs a choice declares (`MemorySpec.extra_inputs`) come from
the projections of `EXTRA_INPUTS`, so a new choice with its own input adds one entry there.

The memory's initial weights M_0 are learned per head (leaves [H, d_in, d_out], logical axes
("heads", "memory_state", "memory_state"): `optim.routing` trains them with AdamW and no
weight decay); the batch starts from the same M_0. Departures from the paper: the
inner loss carries a 1/2 (θ is the delta rule's β), the gradient is taken at the retained
memory exp(g_t) M_{t-1} (as Gated DeltaNet), and lr_max caps θ (the paper gives no value):
by default (`lr_max=None`, `default_lr_max`) at the edge of the inner step's stability
(from the inner loss's curvature, the Omega window and momentum) for the MLP memory with
gated decay or ℓq retention and a gradient rule, 0.1 otherwise (titans-pytorch's training
scripts use 0.1).

Packed sequences (`segment_ids`): at each document start the memory restarts from M_0
with zero momentum and an empty Omega window, a chunk starts there
(`pallas_kernels.neural_memory.segments`), and the short convolutions do not reach into
the previous document; the Pallas kernels take no segment_ids, so packed rows run chunked.

Decoding (`init_cache`, `extend`) reproduces the chunked training forward exactly, not the
exact token rule: the cache keeps the memory at the start of the current chunk and the
chunk's tokens so far, and each new token re-runs that partial chunk (`chunked.chunk_step`,
O(chunk_size) per token), so chunk boundaries fall where they fall in the full forward
(positions 0, b, 2b, ...). With chunk_size 1 both are the exact token rule (eqs. 9-14).
The recurrence state carries whatever a choice needs across chunks (the Omega rule's last
c - 1 tokens, ℓq's accumulator, KL's log-weights), so the cached chunk-start state does too.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.feature_maps import feature_dim, make_feature_map
from layers.gated_output import GatedOutput
from layers.memory_writes import DeepMemoryWrites
from layers.norms import l2_normalize
from layers.sharding import projection, with_logical_axes
from layers.short_conv import ShortConv
from pallas_kernels import neural_memory as recurrence
from pallas_kernels.neural_memory import MemoryInputs, MemorySpec, NeuralMemoryState, api
from pallas_kernels.neural_memory.choices_miras import PAIR_GATE_PREFIX
from pallas_kernels.neural_memory.chunked import chunk_step
from pallas_kernels.neural_memory.memory_inputs import from_named, pad_values

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


class ExtraInput(NamedTuple):
    """How the layer makes a per-token input a choice declares (`MemorySpec.extra_inputs`):
    a per-head projection x W + b named `attribute`, b = bias_init(head_dim) at init, and
    `activation` of its float32 logits."""

    attribute: str
    bias_init: Callable[[int], float]
    activation: Callable


EXTRA_INPUTS = {
    "huber_delta": ExtraInput(
        "huber_threshold", huber_bias_init, lambda z: jax.nn.softplus(z) + HUBER_DELTA_MIN
    ),
    "omega_gate": ExtraInput("omega_gate", lambda _: OMEGA_GATE_BIAS_INIT, jax.nn.sigmoid),
}


def memory_weight_init(key, shape, dtype=jnp.float32):
    """N(0, 1/d_in) per head: M_0(x) keeps the scale of x ([H, d_in, d_out])."""
    return jax.random.normal(key, shape, dtype) * shape[-2] ** -0.5


def log_probability_init(key, shape, dtype=jnp.float32):
    """N(0, 1) log-probabilities for KL retention (Memora), whose weights are softmax(P)
    over d_in: with N(0, 1/d_in) the softmax is nearly uniform, every output unit starts as
    the same average of its inputs, and the memory's parameter-free LN divides by their
    tiny spread (float32 rounding grows ~10x, measured). Unit spread gives distinct units."""
    return jax.random.normal(key, shape, dtype)


class NeuralMemory(nnx.Module):
    """Titans' neural memory as a sequence mixer (module docstring). x [B, T, D] -> [B, T, D].

    Matmuls run in `dtype` (parameters float32); gates, norms and the memory are float32.
    `conv_size=0` disables the short convolutions (SiLU is kept). `feature_map` applies a φ
    of degree `feature_degree` to q and k (`layers.feature_maps`): "monomial" (ATLAS's φ_p;
    q, k become [.., key_dim], key_dim = Σ_i C(hd+i-1, i), and the memory maps key_dim ->
    head_dim), "polynomial" (element-wise, key_dim = head_dim) or "identity" (none).
    `gate_init_std`: the std of the per-token gates' kernels (`GATE_INIT_STD`, 0: every token
    starts at the gate biases); the other projections use `init_std`.
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        head_dim: int,
        spec: MemorySpec,
        chunk_size: int = 16,
        conv_size: int = 4,
        lr_max: float | None = None,
        impl: str = "auto",
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        out_init_std: float = 0.02,
        gate_init_std: float = GATE_INIT_STD,
        feature_map: str = "identity",
        feature_degree: int = 2,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        feature_module = make_feature_map(feature_map, num_heads, feature_degree)  # checks
        self.spec = spec
        self.num_heads, self.head_dim = num_heads, head_dim
        self.key_dim = feature_dim(feature_map, head_dim, feature_degree)  # φ(q), φ(k) width
        self.chunk_size, self.conv_size = chunk_size, conv_size
        if lr_max is None:
            lr_max = default_lr_max(spec, self.key_dim, head_dim)
        self.lr_max, self.impl = lr_max, impl
        self.dtype = dtype
        width = num_heads * head_dim

        def linear(features_out, axes, bias=None, std=init_std):
            return projection(
                d_model, features_out, std=std, axes=axes, dtype=dtype, bias=bias, rngs=rngs
            )

        def gate(bias):  # one logit per head and token
            return linear(num_heads, ("embed", "heads"), bias=bias, std=gate_init_std)

        self.query, self.key, self.value = (linear(width, ("embed", "qkv")) for _ in range(3))
        if conv_size > 0:
            self.query_conv, self.key_conv, self.value_conv = (
                ShortConv(width, conv_size, rngs=rngs) for _ in range(3)
            )
        self.step_size = gate(STEP_SIZE_BIAS_INIT)
        if spec.learning_rule.uses_momentum:
            self.momentum = gate(MOMENTUM_BIAS_INIT)
        self.decay = gate(DECAY_BIAS_INIT)
        weight_init = log_probability_init if spec.retention == "kl" else memory_weight_init
        init = with_logical_axes(weight_init, "heads", "memory_state", "memory_state")
        self.initial_weights = nnx.Dict(
            {
                name: nnx.Param(init(rngs.params(), (num_heads,) + shape, jnp.float32))
                for name, shape in spec.weight_shapes(self.key_dim, head_dim).items()
            }
        )
        self.output = GatedOutput(
            d_model,
            num_heads,
            head_dim,
            eps=norm_eps,
            init_std=init_std,
            out_init_std=out_init_std,
            dtype=dtype,
            rngs=rngs,
        )
        # Built last, so a Titans layer draws exactly the parameters it always did.
        for item in spec.extra_inputs:
            extra = _extra_input(item.name)
            setattr(self, extra.attribute, gate(extra.bias_init(head_dim)))
        self.feature_map = feature_module

    # ---- pieces, also used by the Titans blocks (models.titans) --------------------------

    def _conv(self, name, projected, conv_states, new_conv_states, segment_ids=None):
        if self.conv_size == 0:
            return jax.nn.silu(projected)
        conv_state = None if conv_states is None else conv_states[name]
        y, new_conv_states[name] = getattr(self, f"{name}_conv")(
            projected, conv_state=conv_state, segment_ids=segment_ids
        )
        return y

    def _normalize(self, x):
        """ℓ2 norm per head, then the feature map φ (bounded powers; `layers.feature_maps`)."""
        x = l2_normalize(x)
        return x if self.feature_map is None else self.feature_map(x)

    def queries(self, x, conv_states=None, segment_ids=None):
        """Read queries only: x [B, T, D] -> (φ(q / ‖q‖) [B, T, H, key_dim], new conv states)."""
        new_states = {}
        q = self._conv("query", self.query(x), conv_states, new_states, segment_ids)
        return self._normalize(q.reshape(*x.shape[:2], self.num_heads, -1)), new_states

    def features(self, x, conv_states=None, segment_ids=None):
        """x [B, T, D] -> (MemoryInputs: q, k [B, T, H, key_dim], v [B, T, H, hd]; lr, momentum,
        log_decay [B, T, H] float32 (momentum None for the GD rule); the spec's declared extras
        (`EXTRA_INPUTS`) [B, T, H] float32, new conv states {query, key, value: [B, K-1, C]}).
        segment_ids [B, T]: the convolutions stay inside each packed document."""
        heads = (*x.shape[:2], self.num_heads, -1)
        q, new_states = self.queries(x, conv_states, segment_ids)
        k = self._conv("key", self.key(x), conv_states, new_states, segment_ids)
        v = self._conv("value", self.value(x), conv_states, new_states, segment_ids)
        eta = None
        if self.spec.learning_rule.uses_momentum:
            eta = jax.nn.sigmoid(self.momentum(x).astype(jnp.float32))
        decay_logits = self.decay(x).astype(jnp.float32)
        extra = {}
        for item in self.spec.extra_inputs:
            made = _extra_input(item.name)
            extra[item.name] = made.activation(getattr(self, made.attribute)(x).astype(jnp.float32))
        inputs = MemoryInputs(
            q=q,
            k=self._normalize(k.reshape(heads)),
            v=v.reshape(heads),
            lr=self.lr_max * jax.nn.sigmoid(self.step_size(x).astype(jnp.float32)),
            momentum=eta,
            log_decay=-jax.nn.softplus(decay_logits),  # log(1 - sigmoid(a)), finite for any a
            extra=extra,
        )
        return inputs, new_states

    def writes(self, x) -> DeepMemoryWrites:
        """What the memory writes reading x [B, T, D] (the probe contract)."""
        inputs, _ = self.features(x)
        return DeepMemoryWrites(self.spec, self.chunk_size, inputs, self.initial_state(x.shape[0]))

    def initial_state(self, batch_size: int) -> NeuralMemoryState:
        initial = {name: param[...] for name, param in self.initial_weights.items()}
        return recurrence.init_state(self.spec, initial, batch_size)

    def recur(self, inputs, state, *, chunk_size=None, segment_ids=None):
        """The memory over a sequence from `state` -> (o [B, T, H, hd], final state); with
        segment_ids [B, T] every packed document restarts from `state`'s weights."""
        return recurrence.neural_memory(
            inputs,
            memory=self.spec,
            initial_state=state,
            chunk_size=chunk_size or self.chunk_size,
            output_final_state=True,
            impl=self.impl,
            segment_ids=segment_ids,
        )

    def read(self, state: NeuralMemoryState, q):
        """M(q) without an update (Titans eq. 15): q [B, T, H, key_dim] -> [B, T, H, hd] float32.

        `api.read` applies the memory with its effective weights (ℓq / KL retention keep
        an accumulator or log-weights in the state)."""
        return api.read(self.spec, state, q.astype(jnp.float32))

    # ---- the layer -------------------------------------------------------------------------

    def __call__(self, x, *, segment_ids=None, chunk_size=None):
        """x [B, T, D] -> (y [B, T, D] in `dtype`, aux: final memory norms, mean over heads).

        `chunk_size` overrides the layer's (chunk_size=1 gives the exact token rule).
        segment_ids [B, T]: packed documents, each run as if alone (module docstring).
        """
        inputs, _ = self.features(x, segment_ids=segment_ids)
        if context_parallel.context_size() > 1:  # T split over the mesh's "context" axis
            o, final_state = context_parallel.deep_memory(
                self.spec, inputs, self.initial_state(x.shape[0]),
                chunk_size=chunk_size or self.chunk_size, segment_ids=segment_ids,
            )  # fmt: skip
        else:
            o, final_state = self.recur(
                inputs, self.initial_state(x.shape[0]), chunk_size=chunk_size,
                segment_ids=segment_ids,
            )  # fmt: skip
        return self.output(o, x), memory_norms(final_state, self.spec)

    def init_cache(self, batch_size: int) -> dict:
        """Memory at the current chunk's start, that chunk's inputs so far ([B, H, b, ...],
        float32), how many of them are filled (int32 scalar), and the conv states."""
        # The inputs of one chunk, heads-major, at `chunked`'s padding values (finite and
        # never read: chunk coefficients are causal).
        scalar = (batch_size, self.num_heads, self.chunk_size)
        shapes = dict.fromkeys(("lr", "log_decay"), scalar) | {
            "q": scalar + (self.key_dim,),
            "k": scalar + (self.key_dim,),
            "v": scalar + (self.head_dim,),
        }
        if self.spec.learning_rule.uses_momentum:
            shapes["momentum"] = scalar
        shapes.update({item.name: scalar for item in self.spec.extra_inputs})
        pads = pad_values(self.spec.extra_inputs)
        buffer = from_named(
            {name: jnp.full(shape, pads[name], jnp.float32) for name, shape in shapes.items()}
        )
        cache = {
            "chunk_start": self.initial_state(batch_size),
            "chunk": buffer,
            "filled": jnp.zeros((), jnp.int32),
        }
        if self.conv_size > 0:
            cache["conv"] = {
                name: getattr(self, f"{name}_conv").init_state(batch_size)
                for name in ("query", "key", "value")
            }
        return cache

    def extend(self, x, cache):
        """Continue the cached sequence by x [B, T, D] -> (y [B, T, D], new cache); equals the
        full forward (same chunk_size) on the whole sequence, restricted to the new rows."""
        inputs, conv = self.features(x, cache.get("conv"))
        o, cache = self.extend_memory(inputs, cache)
        if self.conv_size > 0:
            cache["conv"] = conv
        return self.output(o, x), cache

    def extend_memory(self, inputs, cache, *, ends_chunk=None):
        """The memory part of `extend`: features [B, T, ...] -> (o [B, T, H, hd], cache).

        A chunk ends after chunk_size tokens, and also after token t where `ends_chunk` [T]
        (bool) is set (MAC restarts its chunks at each segment).
        """

        def token_step(carry, scanned):
            start, chunk, filled = carry
            token, forced = scanned
            chunk = jax.tree.map(
                lambda buffer, x: jax.lax.dynamic_update_index_in_dim(buffer, x, filled, 2),
                chunk,
                token,
            )
            state, outputs = chunk_step(self.spec, start, chunk, filled)
            output = jax.lax.dynamic_index_in_dim(outputs, filled, 2, keepdims=False)
            full = (filled == self.chunk_size - 1) | forced
            start = jax.tree.map(lambda new, old: jnp.where(full, new, old), state, start)
            return (start, chunk, jnp.where(full, 0, filled + 1)), output

        tokens = inputs.map(lambda name, x: jnp.moveaxis(x.astype(jnp.float32), 1, 0))  # [T, ...]
        length = inputs.q.shape[1]
        forced = jnp.zeros(length, bool) if ends_chunk is None else ends_chunk
        carry = (cache["chunk_start"], cache["chunk"], cache["filled"])
        (start, chunk, filled), outputs = jax.lax.scan(token_step, carry, (tokens, forced))
        o = jnp.moveaxis(outputs, 0, 1).astype(inputs.v.dtype)  # [B, T, H, hd]
        return o, {**cache, "chunk_start": start, "chunk": chunk, "filled": filled}


def _extra_input(name: str) -> ExtraInput:
    if name.startswith(PAIR_GATE_PREFIX):  # one per window slot, made like the Omega gate
        return EXTRA_INPUTS["omega_gate"]._replace(attribute=name)
    if name not in EXTRA_INPUTS:
        raise ValueError(f"the spec declares a per-token input {name!r} that the layer cannot "
                         f"make; add it to layers.neural_memory.EXTRA_INPUTS")  # fmt: skip
    return EXTRA_INPUTS[name]


def memory_norms(state: NeuralMemoryState, spec: MemorySpec | None = None):
    """Logged metrics: Frobenius norm of each memory (and momentum) leaf, mean over heads:
    {"memory_norm/W1": scalar, "momentum_norm/W1": scalar, ...}. With `spec`, the memory
    norms are those of the weights the network runs on (ℓq / KL retention store others)."""
    prefixes = {"weights": "memory_norm", "momentum": "momentum_norm"}
    norms = {}
    for key, per_head in api.state_norms(state, spec).items():
        part, name = key.split("/", 1)
        norms[f"{prefixes.get(part, part + '_norm')}/{name}"] = jnp.mean(per_head)
    return norms
