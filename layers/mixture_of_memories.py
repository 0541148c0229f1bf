"""Mixture-of-Memories (Du et al. 2025, "MoM: Linear Sequence Modeling with
Mixture-of-Memories", §3): several matrix memories, each written only by the tokens a router
sends to it, plus an always-on shared memory.

    router        p_t = softmax(x_t W_r) over the E memories; the top-k are chosen and their
                  weights renormalised, w_t^m = p_t^m / Σ_{m' chosen} p_t^{m'} (0 if not chosen)
    memory m      its own W_k^m, W_v^m, W_β^m, W_a^m and short convs on keys / values;
                  S_t^m follows `rule` (gated delta rule by default) on the tokens routed to m
    shared        one more memory of the same kind, written by every token (weight 1)
    mixing        o_t = Σ_m w_t^m S_t^{m T} q_t + S_t^{shared T} q_t  (= q_t M̃_t with the
                  mixed memory M̃_t = Σ_m w_t^m S_t^m + S_t^shared of the paper)

then the GDN output block (per-head RMSNorm, SiLU output gate, W_out) as in `LinearMemory`.
The query projection and its conv are shared by all memories (as in the MoM code).

Exactly unchanged when not routed: memory m runs over the *whole* sequence, but a token that
did not choose m gets β = 0 and log-decay g = 0 there (S_t = exp(0) S_{t-1} + 0 = S_{t-1};
for the additive rules, linear attention and GLA, its value is zeroed instead, with the same
effect). The key/value short convs of memory m run over m's routed tokens only
(`subsequence_causal_conv`), so the conv states are untouched as well: the memory's state
after a sequence equals its state after the same sequence with its unrouted tokens removed
(mathematically exactly; numerically to float32 rounding of the chunked recurrence).

Cost: every memory is a full-length recurrence with masked gates (no token gathering), so
compute and activation memory are ≈ (num_memories + 1) × one `LinearMemory` of the same
size (+1 for the shared memory), and so is the decoding state. The memories are folded into
the head axis, so one recurrence call runs them all.

Load balancing (Switch Transformer, Fedus et al. 2022, eq. 4, for top-k):
    L_aux = coef · E · Σ_m f_m P_m,  f_m = share of the T·k routing choices that went to m,
    P_m = mean_t p_t^m.  Both are averaged over every token of the batch; L_aux = coef at
    perfectly uniform routing.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.cpu_layouts import materialised_cotangent
from layers.linear_memory import (
    DECAY_RULES,
    DELTA_RULES,
    MatrixMemoryMixer,
    MatrixMemoryOptions,
    decay_parameters,
    log_decay,
    state_norm,
)
from layers.memory_writes import MatrixMemoryWrites
from layers.norms import l2_normalize
from layers.sharding import projection, with_logical_axes
from layers.short_conv import ShortConv, conv_kernel_init, subsequence_causal_conv
from pallas_kernels import linear_memory as recurrences


def route(router_logits: jax.Array, top_k: int):
    """router_logits [B, T, E] -> (probabilities [B, T, E] f32, weights [B, T, E] f32 summing
    to 1 over the chosen top-k and 0 elsewhere, chosen [B, T, E] bool)."""
    probabilities = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_probabilities, top_indices = jax.lax.top_k(probabilities, top_k)
    top_weights = top_probabilities / jnp.sum(top_probabilities, axis=-1, keepdims=True)
    one_hot = jax.nn.one_hot(top_indices, probabilities.shape[-1], dtype=jnp.float32)
    weights = jnp.einsum("btk,btke->bte", top_weights, one_hot)
    chosen = jnp.sum(one_hot, axis=-2) > 0
    return probabilities, weights, chosen


def load_balance_loss(probabilities: jax.Array, chosen: jax.Array, top_k: int):
    """(E · Σ_m f_m P_m, f [E]) with f_m the share of the routing choices that chose m and
    P_m the mean router probability of m, over all tokens (see the module docstring)."""
    num_memories = probabilities.shape[-1]
    flat_chosen = chosen.reshape(-1, num_memories).astype(jnp.float32)
    load_fraction = jnp.mean(flat_chosen, axis=0) / top_k
    mean_probability = jnp.mean(probabilities.reshape(-1, num_memories), axis=0)
    return num_memories * jnp.sum(load_fraction * mean_probability), load_fraction


class MixtureOfMemories(MatrixMemoryMixer):
    """MoM mixer (see the module docstring). x [B, T, D] -> (y [B, T, D], aux).

    Memory index m < num_memories is a routed memory; index num_memories (when
    `shared_memory`) is the shared one. Stacked weights carry a leading "experts" axis.
    `options` are every memory's, the fields of `MatrixMemoryOptions` (num_heads and
    head_dim required; rule defaults to "gated_deltanet").
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_memories: int = 4,
        top_k: int = 2,
        shared_memory: bool = True,
        aux_loss_coef: float = 0.01,
        rngs: nnx.Rngs,
        **options,
    ):
        options = MatrixMemoryOptions(**{"rule": "gated_deltanet", **options})
        if not 1 <= top_k <= num_memories:
            raise ValueError(f"top_k={top_k} must be in [1, num_memories={num_memories}]")
        self._set_options(options)
        self.num_memories, self.top_k = num_memories, top_k
        self.shared_memory, self.aux_loss_coef = shared_memory, aux_loss_coef
        self.total_memories = num_memories + int(shared_memory)
        num_heads, conv_size, init_std = self.num_heads, self.conv_size, options.init_std
        key_width, value_width = num_heads * self.key_dim, num_heads * self.value_dim

        normal = nnx.initializers.normal(init_std)

        def stacked(init, shape, *axes):
            full_shape = (self.total_memories, *shape)
            return nnx.Param(
                with_logical_axes(init, "experts", *axes)(rngs.params(), full_shape, jnp.float32)
            )

        self.query = projection(
            d_model, key_width, std=init_std, axes=("embed", "qkv"), dtype=self.dtype, rngs=rngs
        )
        self.router = projection(
            d_model, num_memories, std=init_std, axes=("embed", "experts"), rngs=rngs
        )
        self.key_kernel = stacked(normal, (d_model, key_width), "embed", "qkv")
        self.value_kernel = stacked(normal, (d_model, value_width), "embed", "qkv")
        if conv_size > 0:
            self.query_conv = ShortConv(key_width, conv_size, rngs=rngs)
            self.key_conv_kernel = stacked(conv_kernel_init, (conv_size, key_width), "conv", "qkv")
            self.value_conv_kernel = stacked(
                conv_kernel_init, (conv_size, value_width), "conv", "qkv"
            )
        if self.rule in DELTA_RULES:
            self.beta_kernel = stacked(normal, (d_model, num_heads), "embed", "heads")
        if self.rule in DECAY_RULES:
            self.decay_kernel = stacked(normal, (d_model, num_heads), "embed", "heads")
            # One decay rate per head, shared by the memories (as in the MoM code).
            self.a_log, self.dt_bias = decay_parameters(num_heads, rngs)
        self.output = self._gated_output(d_model, options, rngs)

    def route(self, x):
        """x [B, T, D] -> (probabilities, weights, chosen), each [B, T, num_memories]."""
        return route(self.router(x.astype(jnp.float32)), self.top_k)

    def _per_memory(self, x, kernel):
        """x [B, T, D] @ stacked kernel [M, D, C] -> [B, T, M, C] in the compute dtype."""
        return jnp.einsum("btd,mdc->btmc", x.astype(self.dtype), kernel[...].astype(self.dtype))

    def _memory_conv(self, projected, kernel, routed, conv_state, segment_ids):
        """SiLU(conv over each memory's routed tokens) of projected [B, T, M, C]."""
        if self.conv_size == 0:
            return jax.nn.silu(projected), None

        def conv(x, kernel, selected, conv_state):
            return subsequence_causal_conv(
                x, kernel, selected, conv_state=conv_state, segment_ids=segment_ids
            )

        # Outside the vmap, where its conditional stays a conditional (`layers.cpu_layouts`).
        projected = materialised_cotangent(projected)
        y, new_state = jax.vmap(conv, in_axes=(2, 0, 2, 1), out_axes=(2, 1))(
            projected, kernel[...], routed, conv_state
        )
        return jax.nn.silu(y), new_state.astype(jnp.float32)

    def _routed_features(self, name, x, routed, conv_state, segment_ids, new_cache):
        """Every memory's keys or values (`name`) [B, T, M, C], convolved over its routed
        tokens; the new conv state goes to new_cache["conv_<name>"]."""
        conv_kernel = getattr(self, f"{name}_conv_kernel") if self.conv_size else None
        projected = self._per_memory(x, getattr(self, f"{name}_kernel"))
        y, new_cache[f"conv_{name}"] = self._memory_conv(
            projected, conv_kernel, routed, conv_state, segment_ids
        )
        return y

    def _zero_conv_states(self, batch_size):
        taps = self.conv_size - 1
        width = self.num_heads * self.key_dim, self.num_heads * self.value_dim
        return tuple(
            jnp.zeros((batch_size, self.total_memories, taps, w), jnp.float32) for w in width
        )

    def _run(self, x, cache, segment_ids):
        """Shared by __call__ and extend: (y, new cache, routing (probabilities, chosen))."""
        features, new_cache, mix, routing = self.features(x, cache, segment_ids)
        batch, length = x.shape[:2]
        memories, heads = self.total_memories, self.num_heads
        initial_state = None
        if cache is not None:
            initial_state = cache["state"].reshape(
                batch, memories * heads, *cache["state"].shape[3:]
            )
        inputs = [features[name] for name in ("q", "k", "v", "g", "beta")]
        if cache is None and context_parallel.context_size() > 1:  # T split over "context"
            o, final_state = context_parallel.matrix_memory(
                self.rule, *inputs, segment_ids=segment_ids, chunk_size=self.chunk_size,
                impl=self.impl,
            )  # fmt: skip
        else:
            o, final_state = recurrences.recurrence(
                self.rule,
                *inputs,
                initial_state=initial_state,
                output_final_state=True,
                segment_ids=segment_ids,
                chunk_size=min(self.chunk_size, length),
                impl=self.impl,
            )
        o = o.reshape(batch, length, memories, heads, self.value_dim).astype(jnp.float32)
        mixed = jnp.einsum("btmhv,btm->bthv", o, mix)
        new_cache["state"] = final_state.reshape(
            batch, memories, heads, self.key_dim, self.value_dim
        )
        return self.output(mixed, x), new_cache, routing

    def features(self, x, cache=None, segment_ids=None):
        """What every memory reads and writes, memories folded into heads (memory m, head h
        -> head m * H + h): ({"q", "k", "v" [B, T, M*H, D], "g", "beta" [B, T, M*H] or None,
        "written" [B, T, M*H] bool: the token was routed to that memory}, new conv cache,
        mixing weights [B, T, M], routing (probabilities, chosen))."""
        batch, length, _ = x.shape
        memories, heads = self.total_memories, self.num_heads
        probabilities, weights, chosen = self.route(x)
        routed, mix = chosen, weights
        if self.shared_memory:
            ones = jnp.ones((batch, length, 1))
            routed = jnp.concatenate([chosen, ones > 0], axis=-1)
            mix = jnp.concatenate([weights, ones], axis=-1)

        new_cache = {}
        q = self.query(x)
        if self.conv_size > 0:
            q, new_cache["conv_query"] = self.query_conv(
                q,
                conv_state=None if cache is None else cache["conv_query"],
                segment_ids=segment_ids,
            )
        else:
            q = jax.nn.silu(q)
        q = l2_normalize(q.reshape(batch, length, heads, self.key_dim))

        key_state = value_state = None
        if self.conv_size > 0:
            key_state, value_state = (
                self._zero_conv_states(batch)
                if cache is None
                else (cache["conv_key"], cache["conv_value"])
            )
        k, v = (
            self._routed_features(name, x, routed, conv_state, segment_ids, new_cache)
            for name, conv_state in (("key", key_state), ("value", value_state))
        )
        k = l2_normalize(k.reshape(batch, length, memories, heads, self.key_dim))
        v = v.reshape(batch, length, memories, heads, self.value_dim)
        routed_heads = jnp.broadcast_to(routed[..., None], (batch, length, memories, heads))

        # Unrouted tokens must not touch memory m: g = 0 (no decay) and β = 0 (no write), or
        # v = 0 for the additive rules.
        g = beta = None
        if self.rule in DECAY_RULES:
            g = log_decay(
                self._per_memory(x, self.decay_kernel), self.a_log[...], self.dt_bias[...]
            )
            g = jnp.where(routed_heads, g, 0.0)
        if self.rule in DELTA_RULES:
            beta = jax.nn.sigmoid(self._per_memory(x, self.beta_kernel).astype(jnp.float32))
            beta = jnp.where(routed_heads, beta, 0.0)
        else:
            v = jnp.where(routed_heads[..., None], v, jnp.zeros_like(v))

        # Fold memories into heads: one recurrence call for all of them.
        folded = batch, length, memories * heads
        q_all = jnp.broadcast_to(q[:, :, None], (batch, length, memories, heads, self.key_dim))
        features = {
            "q": q_all.reshape(*folded, self.key_dim),
            "k": k.reshape(*folded, self.key_dim),
            "v": v.reshape(*folded, self.value_dim),
            "g": None if g is None else g.reshape(folded),
            "beta": None if beta is None else beta.reshape(folded),
            "written": routed_heads.reshape(folded),
        }
        if self.conv_size == 0:
            del new_cache["conv_key"], new_cache["conv_value"]
        return features, new_cache, mix, (probabilities, chosen)

    def writes(self, x) -> MatrixMemoryWrites:
        """Every memory's writes reading x [B, T, D], memories folded into heads, with which
        (token, head) pairs were routed there (the probe contract)."""
        features = self.features(x)[0]
        inputs = (features[name] for name in ("q", "k", "v", "g", "beta"))
        return MatrixMemoryWrites(self.rule, *inputs, written=features["written"])

    def __call__(self, x, *, segment_ids=None):
        """x [B, T, D] -> (y [B, T, D], aux): 'aux_loss/load_balance', 'load/memory_<m>'
        (share of routing choices per memory) and 'state_norm' (mean norm of the final states)."""
        y, final, (probabilities, chosen) = self._run(x, None, segment_ids)
        balance, load_fraction = load_balance_loss(probabilities, chosen, self.top_k)
        aux = {"aux_loss/load_balance": self.aux_loss_coef * balance}
        aux.update({f"load/memory_{m}": load_fraction[m] for m in range(self.num_memories)})
        aux["state_norm"] = state_norm(final["state"])
        return y, aux

    def init_cache(self, batch_size: int) -> dict[str, jax.Array]:
        """Empty memories: state [B, M, H, Dk, Dv] (M = num_memories + shared) and conv
        states conv_query [B, K-1, H Dk], conv_key / conv_value [B, M, K-1, H Dk / H Dv]."""
        shape = (batch_size, self.total_memories, self.num_heads, self.key_dim, self.value_dim)
        cache = {"state": jnp.zeros(shape, jnp.float32)}
        if self.conv_size > 0:
            cache["conv_query"] = self.query_conv.init_state(batch_size)
            cache["conv_key"], cache["conv_value"] = self._zero_conv_states(batch_size)
        return cache

    def extend(self, x, cache):
        """Continue the cached sequence with x [B, T, D] -> (y [B, T, D], new cache)."""
        y, new_cache, _ = self._run(x, cache, None)
        return y, new_cache
