"""Memory Caching (Behrouz et al., "Memory Caching: RNNs with Growing Memory"): a recurrent
memory whose state is cached at the end of every segment, so that later tokens read the
current (online) memory and the cached states of earlier segments.

The paper's text was not available when this was written; the equations below are the
summary the work was specified from. The sequence is split into segments of `segment_size`
tokens; M^{(i)} is the memory's state at the end of segment i, M_t the online memory. A
token t in segment s reads

    residual  y_t = M_t(q_t) + Σ_{i<s} M^{(i)}(q_t)
    grm       y_t = γ_t^{(s)} M_t(q_t) + Σ_{i<s} γ_t^{(i)} M^{(i)}(q_t)       (gated residual)
    ssc       grm with only the top_k cached segments by score kept           (sparse selective)

with γ_t = softmax over i ∈ {cached segments < s, current} of ⟨u_t, k̄_i⟩: u_t = x_t W_u per
head, k̄_i the mean key of segment i (the current segment's: the mean of its keys so far,
causal). ssc masks the other cached segments out of the softmax; it reads every cached
state all the same (no compute saving). Gradients flow into the cached states. y then goes
through the wrapped layer's gated output (per-head RMSNorm ⊙ SiLU gate, W_out).

Two memories are wrapped, their recurrences untouched: Gated DeltaNet
(`layers.linear_memory.LinearMemory`, state S [B, H, Dk, Dv], M(q) = Dk^-1/2 S^T q) and the
Titans neural memory (`layers.neural_memory.NeuralMemory`, MLP weights, M(q) = `read`). The
fast form runs the memory's own chunked recurrence one segment at a time with the states
chained (a `lax.scan` over whole segments, then the partial last one), and reads every cached
state for every token at once (a batched matmul / MLP apply), masked causally (segment s sees
i < s). The naive form it is tested against is `layers.memory_caching_reference`.

Decoding (`init_cache(batch_size, max_length)`, `extend`) runs token by token, caches the
state at each segment end in one of ceil(max_length / segment_size) slots, and equals the
full forward. Packed sequences (segment_ids) are refused: a cached state would have to be
dropped at a document boundary.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from errors import DataError
from layers.linear_memory import LinearMemory, state_norm
from layers.neural_memory import NeuralMemory, memory_norms
from layers.sharding import projection
from pallas_kernels.neural_memory import NeuralMemoryState

AGGREGATIONS = ("grm", "ssc", "residual")


def reject_packing(segment_ids):
    if segment_ids is not None:
        raise DataError(
            "segment_ids: packed sequences are not supported by memory caching (cached "
            "segment states cannot be dropped at document boundaries); feed one document per row"
        )


def aggregate(aggregation, top_k, online, reads, visible, scores=None, current_score=None):
    """Combine the online read with the cached reads (module docstring).

    online [B, T, H, Dv]; reads [B, T, N, H, Dv] (N cached states); visible [B|1, T, N] bool
    (state i is an earlier segment of token t); scores [B, T, N, H] = ⟨u_t, k̄_i⟩ and
    current_score [B, T, H] = ⟨u_t, k̄_current⟩ (grm, ssc) -> y [B, T, H, Dv] float32.
    """
    online = online.astype(jnp.float32)
    keep = jnp.broadcast_to(visible[..., None], reads.shape[:-1])  # [B, T, N, H]
    if aggregation == "residual":
        return online + jnp.sum(jnp.where(keep[..., None], reads, 0.0), axis=2)
    num_cached = reads.shape[2]
    if aggregation == "ssc" and num_cached > 0:
        masked = jnp.moveaxis(jnp.where(keep, scores, -jnp.inf), 2, -1)  # [B, T, H, N]
        _, chosen = jax.lax.top_k(masked, min(top_k, num_cached))
        chosen = jnp.sum(jax.nn.one_hot(chosen, num_cached, dtype=jnp.int32), axis=-2) > 0
        keep = keep & jnp.moveaxis(chosen, -1, 2)
    logits = jnp.concatenate([jnp.where(keep, scores, -jnp.inf), current_score[:, :, None]], 2)
    gates = jax.nn.softmax(logits, axis=2)  # [B, T, N + 1, H]
    cached = jnp.sum(jnp.where(keep[..., None], gates[:, :, :-1, :, None] * reads, 0.0), axis=2)
    return gates[:, :, -1, :, None] * online + cached


def _split(tree, segment_size):
    """Leaves [B, T, ...] -> (whole segments [n, B, S, ...], the rest [B, T - n S, ...])."""

    def whole(x):
        batch, length = x.shape[:2]
        count = length // segment_size
        x = x[:, : count * segment_size].reshape(batch, count, segment_size, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def rest(x):
        return x[:, (x.shape[1] // segment_size) * segment_size :]

    return jax.tree.map(whole, tree), jax.tree.map(rest, tree)


def _running_key_means(k, segment_size):
    """k [B, T, H, Dk] -> (mean key of each whole segment [B, n, H, Dk], each token's
    current-segment mean of the keys so far [B, T, H, Dk])."""
    batch, length = k.shape[:2]
    count = -(-length // segment_size)
    padded = jnp.pad(k, ((0, 0), (0, count * segment_size - length), (0, 0), (0, 0)))
    segments = padded.reshape(batch, count, segment_size, *k.shape[2:])
    seen = jnp.arange(1, segment_size + 1, dtype=jnp.float32)[:, None, None]
    running = (jnp.cumsum(segments, axis=2) / seen).reshape(padded.shape)[:, :length]
    return segments[:, : length // segment_size].mean(axis=2), running


class _MemoryCaching(nnx.Module):
    """What both wrapped memories share: options, the gate projection W_u, the aggregation
    of the fast form and token-by-token decoding. Subclasses give `_features`, `_run`,
    `_step`, `_read` and the memory's own cache."""

    def _setup(self, memory, *, segment_size, aggregation, top_k, init_std, rngs):
        """Keep `memory` (its num_heads, key_dim: the width of its q and k) and the options."""
        self.memory = memory
        self.num_heads, self.key_dim = memory.num_heads, memory.key_dim
        d_model, dtype = memory.query.in_features, memory.dtype
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
        if segment_size < 1 or top_k < 1:
            raise ValueError(f"segment_size={segment_size}, top_k={top_k}: must be >= 1")
        self.segment_size, self.aggregation, self.top_k = segment_size, aggregation, top_k
        if aggregation != "residual":
            width = self.num_heads * self.key_dim
            self.gate_query = projection(
                d_model, width, std=init_std, axes=("embed", "qkv"), dtype=dtype, rngs=rngs
            )

    def _gate_queries(self, x):
        if self.aggregation == "residual":
            return None
        u = self.gate_query(x).astype(jnp.float32)
        return u.reshape(*x.shape[:2], self.num_heads, self.key_dim)

    def _combine(self, online, reads, visible, u, cached_keys, current_keys):
        scores = current = None
        if u is not None:
            scores = jnp.einsum("bthk,bnhk->btnh", u, cached_keys)
            current = jnp.sum(u * current_keys, axis=-1)
        return aggregate(self.aggregation, self.top_k, online, reads, visible, scores, current)

    def __call__(self, x, *, segment_ids=None):
        """x [B, T, D] -> (y [B, T, D], aux: the wrapped memory's metrics of its final state)."""
        reject_packing(segment_ids)
        features, q, k = self._features(x)
        whole, rest = _split(features, self.segment_size)
        state = self._initial_state(x.shape[0])
        outputs, states = [], None
        if jax.tree.leaves(whole)[0].shape[0] > 0:

            def segment(state, inputs):
                o, state = self._run(inputs, state)
                return state, (o, self._cacheable(state))

            state, (o, states) = jax.lax.scan(segment, state, whole)
            outputs.append(jnp.moveaxis(o, 0, 1).reshape(*x.shape[:1], -1, *o.shape[3:]))
        if jax.tree.leaves(rest)[0].shape[1] > 0:
            o, state = self._run(rest, state)
            outputs.append(o)
        online = jnp.concatenate(outputs, axis=1)
        length, count = x.shape[1], x.shape[1] // self.segment_size
        if states is None:  # one partial segment: nothing cached
            reads = jnp.zeros((*online.shape[:2], 0, *online.shape[2:]), jnp.float32)
        else:
            reads = self._read(jax.tree.map(lambda s: jnp.moveaxis(s, 0, 1), states), q)
        segment_of = jnp.arange(length) // self.segment_size
        visible = (jnp.arange(count)[None, :] < segment_of[:, None])[None]  # [1, T, n]
        cached_keys, current_keys = _running_key_means(k, self.segment_size)
        y = self._combine(online, reads, visible, self._gate_queries(x), cached_keys, current_keys)
        return self._output(y.astype(online.dtype), x), self._metrics(state)

    # ---- decoding ---------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """The wrapped memory's cache, ceil(max_length / segment_size) slots of cached states
        and their mean keys, the current segment's key sum and the tokens seen (int32)."""
        slots = max(1, math.ceil(max_length / self.segment_size))
        one = self._cacheable(self._initial_state(batch_size))
        return {
            "memory": self._memory_cache(batch_size),
            "slots": jax.tree.map(
                lambda s: jnp.zeros((s.shape[0], slots, *s.shape[1:]), jnp.float32), one
            ),
            "slot_keys": jnp.zeros((batch_size, slots, self.num_heads, self.key_dim)),
            "key_sum": jnp.zeros((batch_size, self.num_heads, self.key_dim)),
            "length": jnp.zeros((), jnp.int32),
        }

    def extend(self, x, cache):
        """Continue the cached sequence by x [B, T, D] -> (y [B, T, D], new cache)."""
        features, q, k, memory_cache = self._decode_features(x, cache["memory"])
        u = self._gate_queries(x)
        num_slots = cache["slot_keys"].shape[1]

        def token_step(carry, scanned):
            memory_cache, slots, slot_keys, key_sum, length = carry
            feature, q_t, k_t, u_t = scanned
            o, memory_cache, ended_state = self._step(feature, memory_cache)
            key_sum = key_sum + k_t.astype(jnp.float32)
            current_keys = key_sum / (length % self.segment_size + 1).astype(jnp.float32)
            visible = (jnp.arange(num_slots) < length // self.segment_size)[None, None]
            reads = self._read(slots, q_t)
            y = self._combine(
                o, reads, visible, None if u_t is None else u_t[:, None], slot_keys,
                current_keys[:, None],
            )  # fmt: skip
            ends = (length + 1) % self.segment_size == 0
            index = length // self.segment_size

            def store(buffer, value):
                updated = jax.lax.dynamic_update_index_in_dim(buffer, value, index, 1)
                return jnp.where(ends, updated, buffer)

            slots = jax.tree.map(store, slots, self._cacheable(ended_state))
            slot_keys = store(slot_keys, key_sum / self.segment_size)
            key_sum = jnp.where(ends, 0.0, key_sum)
            return (memory_cache, slots, slot_keys, key_sum, length + 1), y[:, 0].astype(o.dtype)

        def time_major(a):  # [B, T, ...] -> [T, B, 1, ...]: one token per scan step
            return jnp.moveaxis(a, 1, 0)[:, :, None]

        features, q = jax.tree.map(time_major, (features, q))
        scanned = (features, q, jnp.moveaxis(k, 1, 0), None if u is None else jnp.moveaxis(u, 1, 0))
        carry = (memory_cache, cache["slots"], cache["slot_keys"], cache["key_sum"])
        carry = (*carry, cache["length"])
        carry, y = jax.lax.scan(token_step, carry, scanned)
        memory_cache, slots, slot_keys, key_sum, length = carry
        y = jnp.moveaxis(y, 0, 1)
        new_cache = {"memory": self._finish_cache(memory_cache)}
        new_cache.update(slots=slots, slot_keys=slot_keys, key_sum=key_sum, length=length)
        return self._output(y, x), new_cache


class GatedDeltaNetMemoryCaching(_MemoryCaching):
    """A matrix memory (`LinearMemory`, built by the caller; the "gdn_mc" block gives it
    rule "gated_deltanet") with memory caching. x [B, T, D] -> y [B, T, D]. init_std: of W_u."""

    def __init__(
        self, memory: LinearMemory, *, segment_size=64, aggregation="grm", top_k=2,
        init_std=0.02, rngs,
    ):  # fmt: skip
        if memory.normalize:
            raise ValueError("memory caching reads S^T q: the memory must have normalize=False")
        self._setup(
            memory, segment_size=segment_size, aggregation=aggregation, top_k=top_k,
            init_std=init_std, rngs=rngs,
        )  # fmt: skip

    def _features(self, x):
        q, k, v, g, beta, _ = self.memory.features(x)
        return (q, k, v, g, beta), q, k

    def _initial_state(self, batch_size):
        shape = (batch_size, self.num_heads, self.key_dim, self.memory.value_dim)
        return jnp.zeros(shape, jnp.float32)

    def _run(self, inputs, state):
        return self.memory._recurrence(*inputs, initial_state=state)

    def _cacheable(self, state):
        return state

    def _read(self, states, q):
        """states [B, N, H, Dk, Dv], q [B, T, H, Dk] -> M^{(i)}(q_t) [B, T, N, H, Dv]."""
        scale = self.key_dim**-0.5
        return scale * jnp.einsum("bthk,bnhkv->btnhv", q.astype(jnp.float32), states)

    def _output(self, y, x):
        return self.memory.output(y, x)

    def _metrics(self, state):
        return {"state_norm": state_norm(state)}

    def writes(self, x):
        return self.memory.writes(x)

    def _memory_cache(self, batch_size):
        return self.memory.init_cache(batch_size)

    def _decode_features(self, x, memory_cache):
        q, k, v, g, beta, conv = self.memory.features(x, cache=memory_cache)
        return (q, k, v, g, beta), q, k, {"state": memory_cache["state"], "conv": conv}

    def _step(self, token, memory_cache):
        o, state = self._run(token, memory_cache["state"])
        return o, {**memory_cache, "state": state}, state

    def _finish_cache(self, memory_cache):
        return {"state": memory_cache["state"], **memory_cache["conv"]}


class NeuralMemoryCaching(_MemoryCaching):
    """The Titans neural memory (`NeuralMemory`, built by the caller) with memory caching.
    segment_size must be a multiple of the memory's chunk_size, so that segment ends are
    chunk ends of its chunked recurrence. init_std: of W_u."""

    def __init__(
        self, memory: NeuralMemory, *, segment_size=64, aggregation="grm", top_k=2,
        init_std=0.02, rngs,
    ):  # fmt: skip
        if segment_size % memory.chunk_size:
            raise ValueError(
                f"segment_size={segment_size} must be a multiple of chunk_size={memory.chunk_size}"
            )
        self._setup(
            memory, segment_size=segment_size, aggregation=aggregation, top_k=top_k,
            init_std=init_std, rngs=rngs,
        )  # fmt: skip

    def _features(self, x):
        inputs, _ = self.memory.features(x)
        return inputs, inputs.q, inputs.k

    def _initial_state(self, batch_size):
        return self.memory.initial_state(batch_size)

    def _run(self, inputs, state):
        return self.memory.recur(inputs, state)

    def _cacheable(self, state):
        return state.weights

    def _read(self, weights, q):
        """weights leaves [B, N, H, d_in, d_out], q [B, T, H, Dk] -> [B, T, N, H, Dv]."""

        def read_one(w):
            return self.memory.read(NeuralMemoryState(w, None, None), q)

        reads = jax.vmap(read_one, in_axes=1, out_axes=2)(weights)
        return reads

    def _output(self, y, x):
        return self.memory.output(y, x)

    def _metrics(self, state):
        return memory_norms(state, self.memory.spec)

    def writes(self, x):
        return self.memory.writes(x)

    def _memory_cache(self, batch_size):
        return self.memory.init_cache(batch_size)

    def _decode_features(self, x, memory_cache):
        inputs, conv = self.memory.features(x, memory_cache.get("conv"))
        carried = {key: value for key, value in memory_cache.items() if key != "conv"}
        return inputs, inputs.q, inputs.k, {"carried": carried, "conv": conv}

    def _step(self, token, memory_cache):
        o, carried = self.memory.extend_memory(token, memory_cache["carried"])
        # segment_size is a multiple of chunk_size: at a segment end the chunk is full and
        # chunk_start holds the memory after the segment's last token.
        return o, {**memory_cache, "carried": carried}, carried["chunk_start"]

    def _finish_cache(self, memory_cache):
        cache = dict(memory_cache["carried"])
        if self.memory.conv_size > 0:
            cache["conv"] = memory_cache["conv"]
        return cache
