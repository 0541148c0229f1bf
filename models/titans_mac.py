"""Titans MAC, "memory as a context" (Behrouz et al. 2024, §4.1), registered as the block
kind "mac". The shared parts (memory construction, gating, options) are in `models.titans`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from errors import ConfigError, DataError
from layers import context_parallel
from layers.attention import (
    attention_mask,
)
from layers.gated_output import GatedOutput
from layers.memory_writes import DeepMemoryWrites, NoMemory
from layers.neural_memory import memory_norms
from layers.norms import RMSNorm
from models.registry import init_std_of
from models.titans import (
    MEMORY_DEFAULTS,
    GatedAttentionBlock,
    register_memory_block,
)

WRITE_STREAMS = ("attention", "residual", "normed_residual")


class MACBlock(GatedAttentionBlock):
    """MAC (§4.1, eqs. 21-25), segment by segment (length N = segment_size, `lax.scan`):

        h   = M*_{s-1}(q_s)                    retrieval, no update (eq. 21), q_s = x_s W_Q
        y_s = Attn([p ‖ h ‖ x_s])               full attention inside the segment (eqs. 22-23)
        M_s = M_{s-1} trained on u_s            keys/values/gates from u_s (eq. 24)
        o_s = y_s ⊗ M_s(u_s)                    (eq. 25)

    then x + o and SwiGLU. The memory's training stream u_s (`write_stream`) is, by default,
    the attention layer's residual output RMSNorm(x_s) + y_s ("residual"); "attention"
    trains it on y_s alone, as eq. 24 is written; "normed_residual" puts the residual output
    through its own RMSNorm. Our reading, for a residual network: with y_s alone the memory's
    keys start as mixtures of the segment's tokens and MAC did not learn 8-pair MQAR through
    its memory (1.8% recall after 1,000 steps, against 98% at step 500 with the residual
    stream). The residual stream's values grow with y_s, and on text the memory's weights
    can blow up (a run went NaN at step 231); the normalised stream is stable there and 0.22
    bits/byte better, but recalled MQAR at one seed of two (96.7% / 13.2% after 1,000 steps),
    so it is not the default (`benchmarks/results/mac_write_stream.md`).

    Departures for causality in an autoregressive LM: h_j =
    M*(q_j) carries token j, so query i sees h_j only for j <= i (as it sees x_j); eq. 25
    reads each token with the memory updated up to that token (o_i = M_i(q(y_i)), the
    recurrence's read-after-update) instead of the memory after the whole segment. The
    retrieved h goes through RMSNorm per head, an output gate and a projection to D before
    attention (`GatedOutput`), and gets the RoPE positions of its x token. T is padded to a
    multiple of N at the end (padding never reaches real tokens; it does enter the logged
    final memory norms). Decoding runs token by token and equals this forward.
    """

    def __init__(self, model_config, block_config, *, rngs):
        super().__init__(model_config, block_config, rngs=rngs)
        self.segment_size = block_config.segment_size
        if block_config.write_stream not in WRITE_STREAMS:
            raise ConfigError(
                f"write_stream: {block_config.write_stream!r} is not one of "
                f"{', '.join(WRITE_STREAMS)}"
            )
        self.write_stream = block_config.write_stream
        if self.write_stream == "normed_residual":
            self.write_norm = RMSNorm(
                model_config.d_model, eps=model_config.norm_eps, dtype=self.dtype, rngs=rngs
            )
        self.retrieval_out = GatedOutput(
            model_config.d_model,
            self.memory.num_heads,
            self.memory.head_dim,
            eps=model_config.norm_eps,
            init_std=init_std_of(model_config),
            out_init_std=init_std_of(model_config),
            dtype=self.dtype,
            rngs=rngs,
        )

    def __call__(self, x, *, positions, segment_ids=None):
        if segment_ids is not None:  # a document start would cut a segment in two
            raise DataError(
                "segment_ids: the mac block does not support packed sequences (its segments "
                "are fixed windows of the row); set data.document_resets=False or use lmm/mal/mag"
            )
        outputs, state, _ = self.segments(x, positions)
        return self._mlp_residual(x + outputs), memory_norms(state)

    def written(self, normed, attended):
        """What the memory is trained on (u of the class docstring): the attention layer's
        residual output RMSNorm(x) + y ("residual"), the same through its own RMSNorm
        ("normed_residual": the memory's values keep the scale of a pre-norm input however
        large y grows) or the attention output y ("attention")."""
        if self.write_stream == "residual":
            return (normed.astype(jnp.float32) + attended).astype(self.dtype)
        if self.write_stream == "normed_residual":
            return self.write_norm(normed.astype(jnp.float32) + attended)
        return attended.astype(self.dtype)

    def segments(self, x, positions):
        """The segment loop -> (gated outputs [B, T, D], final memory state, the memory's
        write inputs (`MemoryInputs` [B, T', ...]: `NeuralMemory.features` of the attention
        outputs, T' = T padded to whole segments; what `evals.memory_behaviour` traces)).

        With T split over the mesh's "context" axis (whole segments per shard,
        `training.sharding.check_context_parallel`) the segments of a row run shard after
        shard, each handing its memory and conv states to the next, pipelined over the rows
        (`context_parallel.pipelined`; the write inputs are not gathered: None)."""
        batch, length, _ = x.shape
        padding = -length % self.segment_size
        normed = self.memory_norm(x)
        normed = jnp.pad(normed, ((0, 0), (0, padding), (0, 0)))
        positions = jnp.pad(positions, ((0, 0), (0, padding)), mode="edge")
        retrieval_queries, _ = self.memory.queries(normed)  # the conv runs across segments
        conv_states = {}
        if self.memory.conv_size > 0:
            conv_states = {
                name: getattr(self.memory, f"{name}_conv").init_state(batch)
                for name in ("query", "key", "value")
            }
        start = (self.memory.initial_state(batch), conv_states)
        tokens = (normed, retrieval_queries, positions)
        if context_parallel.context_size() > 1:
            graph, parameters = nnx.split(self)

            def run(tokens, carry, fresh, segment_ids, parameters):
                del fresh, segment_ids  # MAC takes no packed documents
                block = nnx.merge(graph, parameters)
                outputs, carry, _ = block.segment_scan(tokens, carry)
                return outputs, carry

            outputs, (state, _) = context_parallel.pipelined(run, tokens, start, shared=parameters)
            return outputs[:, :length], state, None
        outputs, (state, _), writes = self.segment_scan(tokens, start)
        return outputs[:, :length], state, writes

    def segment_scan(self, tokens, carry):
        """Segments in order (`lax.scan`) from carry (memory state, conv states of the
        written stream): tokens (normed x [B, S*N, D], retrieval queries, positions) ->
        (gated outputs [B, S*N, D], final carry, write inputs [B, S*N, ...])."""
        batch, size = tokens[0].shape[0], self.segment_size
        num_segments = tokens[0].shape[1] // size

        def segments(a):  # [B, S*N, ...] -> [S, B, N, ...]
            return jnp.moveaxis(a.reshape(batch, num_segments, size, *a.shape[2:]), 1, 0)

        causal = attention_mask(jnp.arange(size), jnp.arange(size))  # [1, N, N]
        mask = jnp.concatenate([causal, causal], axis=-1)  # over [h ‖ x_s]

        def segment_step(carry, segment):
            state, conv_states = carry
            x_s, q_s, positions_s = segment
            retrieved = self.retrieval_out(self.memory.read(state, q_s), x_s)
            query, key, value = self.attention.project(x_s, positions_s)
            _, key_h, value_h = self.attention.project(retrieved, positions_s)
            keys = jnp.concatenate([key_h, key], axis=1)
            values = jnp.concatenate([value_h, value], axis=1)
            attended = self.attend(query, keys, values, mask)
            inputs, conv_states = self.memory.features(self.written(x_s, attended), conv_states)
            read_out, state = self.memory.recur(inputs, state)
            remembered = self.memory.output(read_out, attended.astype(self.dtype))
            return (state, conv_states), (self.gate(attended, remembered), inputs)

        carry, (outputs, writes) = jax.lax.scan(segment_step, carry, jax.tree.map(segments, tokens))

        def unsegment(a):  # [S, B, N, ...] -> [B, S*N, ...]
            return jnp.moveaxis(a, 0, 1).reshape(batch, num_segments * size, *a.shape[3:])

        return unsegment(outputs), carry, jax.tree.map(unsegment, writes)

    def memory_writes(self, x, *, positions):
        """What MAC writes to its memory (the probe contract): each segment's attention
        outputs. Its chunks restart at every segment, which is the sequence-wide chunking
        only when segment_size is a multiple of chunk_size; padding to whole segments comes
        after the real tokens (`length` cuts it off)."""
        if self.segment_size % self.memory.chunk_size:
            return NoMemory(
                f"MAC segment_size {self.segment_size} is not a multiple of the memory's "
                f"chunk_size {self.memory.chunk_size}: not traced"
            )
        writes = self.segments(x, positions)[2]
        state = self.memory.initial_state(x.shape[0])
        return DeepMemoryWrites(self.memory.spec, self.memory.chunk_size, writes, state, x.shape[1])

    # Decoding: the segment's retrieval memory M*_{s-1}, the memory's chunk cache (whose
    # chunks restart at every segment, as `recur` per segment does), the conv states of
    # the x stream (retrieval queries) and of the y stream (updates), and the segment's
    # keys / values so far ([h ‖ x] slots, masked beyond the current index).

    def init_cache(self, batch_size: int, max_length: int):
        del max_length  # attention never reaches past the current segment
        size, attention = self.segment_size, self.attention
        shape = (batch_size, 2 * size, attention.num_kv_heads, attention.head_dim)
        memory_cache = self.memory.init_cache(batch_size)
        conv = memory_cache.pop("conv", {})
        return {
            "segment_start": memory_cache["chunk_start"],
            "memory": memory_cache,
            "x_conv": {name: state for name, state in conv.items() if name == "query"},
            "y_conv": conv,
            "key": jnp.zeros(shape, self.dtype),
            "value": jnp.zeros(shape, self.dtype),
            "index": jnp.zeros((), jnp.int32),  # of the next token within its segment
        }

    def extend(self, x, cache, *, positions):
        """T new tokens, one at a time (`lax.scan`) -> (y [B, T, D], cache); equals the full
        forward restricted to the new rows."""
        size = self.segment_size
        slots = jnp.arange(2 * size) % size

        def token_step(carry, token):
            x_t, positions_t = token[0][:, None], token[1][:, None]  # [B, 1, ...]
            index = carry["index"]
            queries, x_conv = self.memory.queries(x_t, carry["x_conv"] or None)
            retrieved = self.retrieval_out(self.memory.read(carry["segment_start"], queries), x_t)
            query, key, value = self.attention.project(x_t, positions_t)
            _, key_h, value_h = self.attention.project(retrieved, positions_t)

            def write(buffer, h_part, x_part):
                buffer = jax.lax.dynamic_update_index_in_dim(buffer, h_part[:, 0], index, 1)
                return jax.lax.dynamic_update_index_in_dim(buffer, x_part[:, 0], size + index, 1)

            keys = write(carry["key"], key_h.astype(self.dtype), key.astype(self.dtype))
            values = write(carry["value"], value_h.astype(self.dtype), value.astype(self.dtype))
            mask = jnp.broadcast_to(slots <= index, (1, 1, 2 * size))
            attended = self.attend(query, keys, values, mask).astype(self.dtype)
            inputs, y_conv = self.memory.features(
                self.written(x_t, attended), carry["y_conv"] or None
            )
            ends = index == size - 1
            read_out, memory_cache = self.memory.extend_memory(
                inputs, carry["memory"], ends_chunk=ends[None]
            )
            remembered = self.memory.output(read_out, attended)
            new_carry = {
                "segment_start": jax.tree.map(
                    lambda new, old: jnp.where(ends, new, old),
                    memory_cache["chunk_start"],
                    carry["segment_start"],
                ),
                "memory": memory_cache,
                "x_conv": x_conv,
                "y_conv": y_conv,
                "key": keys,
                "value": values,
                "index": jnp.where(ends, 0, index + 1),
            }
            return new_carry, self.gate(attended, remembered)[:, 0]

        tokens = (jnp.moveaxis(self.memory_norm(x), 1, 0), jnp.moveaxis(positions, 1, 0))
        cache, outputs = jax.lax.scan(token_step, cache, tokens)
        return self._mlp_residual(x + jnp.moveaxis(outputs, 0, 1)), cache


# ---- registration ----------------------------------------------------------------------------


register_memory_block(
    "mac",
    MACBlock,
    {
        **MEMORY_DEFAULTS,
        "rope_theta": 10000.0,
        "num_persistent": 4,
        "segment_size": 64,
        "write_stream": "residual",
    },
)
