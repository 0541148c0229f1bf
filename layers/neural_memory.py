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

The memory's initial weights M_0 are learned per head (leaves [H, d_in, d_out], logical axes
("heads", None, None)); the batch starts from the same M_0. Departures from the paper: the
inner loss carries a 1/2 (θ is the delta rule's β), the gradient is taken at the retained
memory exp(g_t) M_{t-1} (as Gated DeltaNet), and lr_max = 0.1 caps θ (titans-pytorch's
training scripts use 0.1; the paper gives no value).

Packed sequences are not supported: the recurrence has no cheap exact reset of M_t to M_0
at a document boundary, so `segment_ids` raises DataError.

Decoding (`init_cache`, `extend`) reproduces the chunked training forward exactly, not the
exact token rule: the cache keeps the memory at the start of the current chunk and the
chunk's tokens so far, and each new token re-runs that partial chunk (`chunked.chunk_step`,
O(chunk_size) per token), so chunk boundaries fall where they fall in the full forward
(positions 0, b, 2b, ...). With chunk_size 1 both are the exact token rule (eqs. 9-14).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear_memory import GatedOutput, l2_normalize
from layers.sharding import with_logical_axes
from layers.short_conv import ShortConv
from pallas_kernels import neural_memory as recurrence
from pallas_kernels.neural_memory import MemorySpec, NeuralMemoryState
from pallas_kernels.neural_memory.chunked import chunk_step
from training.errors import DataError

# Gate biases at init: θ = lr_max / 2, η = 1/2, α = sigmoid(-4) ≈ 0.018 (the memory keeps
# ~98% per token, a half-life of ~38 tokens; sigmoid(0) = 1/2 would forget almost at once).
DECAY_BIAS_INIT = -4.0
# Scalars of padding tokens inside a partial chunk (as `chunked._split_chunks`): finite, and
# never read, since every chunk coefficient is lower triangular.
_PAD_VALUES = {"q": 0.0, "k": 0.0, "v": 0.0, "lr": 0.0, "eta": 1.0, "g": 0.0}


def _feature_dims(name, head_dim):
    """Trailing dims of a per-token input: q, k, v have head_dim features, gates none."""
    return (head_dim,) if name in ("q", "k", "v") else ()


def memory_weight_init(key, shape, dtype=jnp.float32):
    """N(0, 1/d_in) per head: M_0(x) keeps the scale of x ([H, d_in, d_out])."""
    return jax.random.normal(key, shape, dtype) * shape[-2] ** -0.5


class NeuralMemory(nnx.Module):
    """Titans' neural memory as a sequence mixer (module docstring). x [B, T, D] -> [B, T, D].

    Matmuls run in `dtype` (parameters float32); gates, norms and the memory are float32.
    `conv_size=0` disables the short convolutions (SiLU is kept).
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
        lr_max: float = 0.1,
        impl: str = "auto",
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        out_init_std: float = 0.02,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.spec = spec
        self.num_heads, self.head_dim = num_heads, head_dim
        self.chunk_size, self.conv_size = chunk_size, conv_size
        self.lr_max, self.impl = lr_max, impl
        self.dtype = dtype
        width = num_heads * head_dim

        def linear(features_out, axes, bias=None):
            return nnx.Linear(
                d_model,
                features_out,
                use_bias=bias is not None,
                dtype=dtype,
                kernel_init=with_logical_axes(nnx.initializers.normal(init_std), *axes),
                bias_init=with_logical_axes(nnx.initializers.constant(bias or 0.0), axes[-1]),
                rngs=rngs,
            )

        self.query, self.key, self.value = (linear(width, ("embed", "qkv")) for _ in range(3))
        if conv_size > 0:
            self.query_conv, self.key_conv, self.value_conv = (
                ShortConv(width, conv_size, rngs=rngs) for _ in range(3)
            )
        self.step_size = linear(num_heads, ("embed", "heads"), bias=0.0)
        if spec.learning_rule.uses_momentum:
            self.momentum = linear(num_heads, ("embed", "heads"), bias=0.0)
        self.decay = linear(num_heads, ("embed", "heads"), bias=DECAY_BIAS_INIT)
        init = with_logical_axes(memory_weight_init, "heads", None, None)
        self.initial_weights = nnx.Dict(
            {
                name: nnx.Param(init(rngs.params(), (num_heads,) + shape, jnp.float32))
                for name, shape in spec.weight_shapes(head_dim, head_dim).items()
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

    # ---- pieces, also used by the Titans blocks (models.titans) --------------------------

    def _conv(self, name, projected, conv_states, new_conv_states):
        if self.conv_size == 0:
            return jax.nn.silu(projected)
        conv_state = None if conv_states is None else conv_states[name]
        y, new_conv_states[name] = getattr(self, f"{name}_conv")(projected, conv_state=conv_state)
        return y

    def queries(self, x, conv_states=None):
        """Read queries only: x [B, T, D] -> (q [B, T, H, hd] unit norm, new conv states)."""
        new_states = {}
        q = self._conv("query", self.query(x), conv_states, new_states)
        return l2_normalize(q.reshape(*x.shape[:2], self.num_heads, -1)), new_states

    def features(self, x, conv_states=None):
        """x [B, T, D] -> ({q, k, v [B, T, H, hd]; lr, eta, g [B, T, H] float32 (eta None
        for the GD rule)}, new conv states {query, key, value: [B, K-1, C]})."""
        heads = (*x.shape[:2], self.num_heads, -1)
        q, new_states = self.queries(x, conv_states)
        k = self._conv("key", self.key(x), conv_states, new_states)
        v = self._conv("value", self.value(x), conv_states, new_states)
        eta = None
        if self.spec.learning_rule.uses_momentum:
            eta = jax.nn.sigmoid(self.momentum(x).astype(jnp.float32))
        decay_logits = self.decay(x).astype(jnp.float32)
        inputs = {
            "q": q,
            "k": l2_normalize(k.reshape(heads)),
            "v": v.reshape(heads),
            "lr": self.lr_max * jax.nn.sigmoid(self.step_size(x).astype(jnp.float32)),
            "eta": eta,
            "g": -jax.nn.softplus(decay_logits),  # log(1 - sigmoid(a)), finite for any a
        }
        return inputs, new_states

    def initial_state(self, batch_size: int) -> NeuralMemoryState:
        initial = {name: param[...] for name, param in self.initial_weights.items()}
        return recurrence.init_state(self.spec, initial, batch_size)

    def recur(self, inputs, state, *, chunk_size=None):
        """The memory over a sequence from `state` -> (o [B, T, H, hd], final state)."""
        return recurrence.neural_memory(
            inputs["q"],
            inputs["k"],
            inputs["v"],
            inputs["lr"],
            inputs["eta"],
            inputs["g"],
            memory=self.spec,
            initial_state=state,
            chunk_size=chunk_size or self.chunk_size,
            output_final_state=True,
            impl=self.impl,
        )

    def read(self, state: NeuralMemoryState, q):
        """M(q) without an update (Titans eq. 15): q [B, T, H, hd] -> [B, T, H, hd] float32."""
        queries = jnp.moveaxis(q.astype(jnp.float32), 1, 2)  # [B, H, T, hd]
        output, _ = self.spec.memory_architecture.forward(state.weights, queries)
        return jnp.moveaxis(output, 2, 1)

    # ---- the layer -------------------------------------------------------------------------

    def __call__(self, x, *, segment_ids=None, chunk_size=None):
        """x [B, T, D] -> (y [B, T, D] in `dtype`, aux: final memory norms, mean over heads).

        `chunk_size` overrides the layer's (chunk_size=1 gives the exact token rule).
        """
        if segment_ids is not None:
            raise DataError(
                "segment_ids: packed sequences are not supported by the Titans neural memory "
                "(its state cannot be reset at document boundaries); feed one document per row"
            )
        inputs, _ = self.features(x)
        o, final_state = self.recur(inputs, self.initial_state(x.shape[0]), chunk_size=chunk_size)
        return self.output(o, x), memory_norms(final_state)

    def init_cache(self, batch_size: int) -> dict:
        """Memory at the current chunk's start, that chunk's inputs so far ([B, H, b, ...],
        float32), how many of them are filled (int32 scalar), and the conv states."""
        chunk = (batch_size, self.num_heads, self.chunk_size)
        buffer = {
            name: jnp.full(
                chunk + ((self.head_dim,) if name in ("q", "k", "v") else ()), pad, jnp.float32
            )
            for name, pad in _PAD_VALUES.items()
        }
        if not self.spec.learning_rule.uses_momentum:
            del buffer["eta"]
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

        def token_step(carry, token):
            start, chunk, filled = carry
            forced = token.pop("ends_chunk")
            chunk = {
                name: jax.lax.dynamic_update_index_in_dim(chunk[name], token[name], filled, 2)
                for name in chunk
            }
            args = tuple(chunk.get(name) for name in ("q", "k", "v", "lr", "eta", "g"))
            state, outputs = chunk_step(self.spec, start, args + (filled,))
            output = jax.lax.dynamic_index_in_dim(outputs, filled, 2, keepdims=False)
            full = (filled == self.chunk_size - 1) | forced
            start = jax.tree.map(lambda new, old: jnp.where(full, new, old), state, start)
            return (start, chunk, jnp.where(full, 0, filled + 1)), output

        tokens = {  # time-major [T, B, H, ...] float32
            name: jnp.moveaxis(inputs[name].astype(jnp.float32), 1, 0) for name in cache["chunk"]
        }
        length = inputs["q"].shape[1]
        tokens["ends_chunk"] = jnp.zeros(length, bool) if ends_chunk is None else ends_chunk
        carry = (cache["chunk_start"], cache["chunk"], cache["filled"])
        (start, chunk, filled), outputs = jax.lax.scan(token_step, carry, tokens)
        o = jnp.moveaxis(outputs, 0, 1).astype(inputs["v"].dtype)  # [B, T, H, hd]
        return o, {**cache, "chunk_start": start, "chunk": chunk, "filled": filled}


def memory_norms(state: NeuralMemoryState) -> dict[str, jax.Array]:
    """Logged metrics: Frobenius norm of each memory (and momentum) leaf, mean over heads:
    {"memory_norm/W1": scalar, "momentum_norm/W1": scalar, ...}."""
    norms = {}
    for key, per_head in recurrence.state_norms(state).items():
        part, name = key.split("/")
        prefix = "memory_norm" if part == "weights" else "momentum_norm"
        norms[f"{prefix}/{name}"] = jnp.mean(per_head)
    return norms
