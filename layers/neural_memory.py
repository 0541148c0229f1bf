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
by default (`lr_max=None`) at the edge of the inner step's stability (from the inner loss's
curvature, the Omega window and momentum) for the MLP memory with gated decay or ℓq
retention and a gradient rule, 0.1 otherwise (titans-pytorch's training scripts use 0.1).
That cap, the gate biases and the initial weights are in `layers.neural_memory_init`.

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

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.feature_maps import feature_dim, make_feature_map
from layers.gated_output import GatedOutput
from layers.memory_writes import DeepMemoryWrites
from layers.neural_memory_init import (
    DECAY_BIAS_INIT,
    GATE_INIT_STD,
    HUBER_DELTA_MIN,
    MOMENTUM_BIAS_INIT,
    OMEGA_GATE_BIAS_INIT,
    STEP_SIZE_BIAS_INIT,
    default_lr_max,
    huber_bias_init,
    log_probability_init,
    memory_weight_init,
)
from layers.norms import l2_normalize
from layers.sharding import projection, with_logical_axes
from layers.short_conv import ShortConv
from pallas_kernels import neural_memory as recurrence
from pallas_kernels.neural_memory import MemoryInputs, MemorySpec, NeuralMemoryState, api
from pallas_kernels.neural_memory.choices_miras import PAIR_GATE_PREFIX
from pallas_kernels.neural_memory.chunked import chunk_step
from pallas_kernels.neural_memory.memory_inputs import from_named, pad_values


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
