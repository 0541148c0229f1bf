"""The language model: embedding -> blocks from `model.block_pattern` -> RMSNorm -> head.

Also home of the baseline pre-norm Transformer block, registered as the block kinds
"attention" (full causal attention) and "swa" (the same block with a sliding window).

Decoding: every block kind implements `init_cache(batch_size, max_length) -> cache` (a
pytree of arrays) and `extend(x, cache, *, positions) -> (y, cache)`; the model chains them
in `LanguageModel.init_cache` / `LanguageModel.extend` (sampling: `models.generate`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from errors import ConfigError
from layers.attention import Attention
from layers.memory_writes import NoMemory
from layers.mlp import SwiGLU
from layers.norms import RMSNorm
from layers.sharding import projection, with_logical_axes
from models.losses import cross_entropy_terms
from models.registry import (
    AUX_LOSS_PREFIX,
    build_block,
    compute_dtype_of,
    head_dim_of,
    init_std_of,
    mlp_dim_of,
    register_block,
    register_model,
    residual_out_init_std,
)


class TransformerBlock(nnx.Module):
    """Pre-norm Transformer block (as in Llama): x + Attn(RMSNorm(x)), then + SwiGLU(RMSNorm(.)).

    The residual stream stays float32; the branches compute in `model.compute_dtype`.
    """

    def __init__(self, model_config, block_config, *, layer_index: int, rngs: nnx.Rngs):
        del layer_index  # every layer of this kind is built the same way
        d_model, dtype = model_config.d_model, compute_dtype_of(model_config)
        num_kv_heads = block_config.num_kv_heads or model_config.num_heads
        if num_kv_heads < 1 or model_config.num_heads % num_kv_heads:
            raise ConfigError(
                f"num_kv_heads: num_heads={model_config.num_heads} is not a multiple of "
                f"num_kv_heads={num_kv_heads}"
            )
        if head_dim_of(model_config) % 2:
            raise ConfigError(
                f"model.head_dim: RoPE needs an even head_dim, got {head_dim_of(model_config)}"
            )
        if block_config.window < 0:
            raise ConfigError(f"window: must be >= 0 (0 = unbounded), got {block_config.window}")
        out_init_std = residual_out_init_std(model_config)
        self.attention_norm = RMSNorm(d_model, eps=model_config.norm_eps, dtype=dtype, rngs=rngs)
        self.attention = Attention(
            d_model,
            num_heads=model_config.num_heads,
            head_dim=head_dim_of(model_config),
            num_kv_heads=num_kv_heads,
            window=block_config.window,
            rope_theta=block_config.rope_theta,
            init_std=init_std_of(model_config),
            out_init_std=out_init_std,
            dtype=dtype,
            rngs=rngs,
        )
        self.mlp_norm = RMSNorm(d_model, eps=model_config.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = SwiGLU(
            d_model,
            mlp_dim_of(model_config),
            init_std=init_std_of(model_config),
            out_init_std=out_init_std,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x, *, positions, segment_ids=None):
        attended = self.attention(
            self.attention_norm(x), positions=positions, segment_ids=segment_ids
        )
        x = x + attended.astype(jnp.float32)
        return self._mlp_residual(x), {}

    def memory_writes(self, x, *, positions):
        del x, positions
        return NoMemory("attention keeps every key and value; no memory is trained")

    def init_cache(self, batch_size: int, max_length: int):
        """The attention's KV cache (see `layers.attention.Attention.init_cache`)."""
        return self.attention.init_cache(batch_size, max_length)

    def extend(self, x, cache, *, positions):
        """The block on T new tokens x [B, T, D] that follow the cached ones -> (y, cache)."""
        attended, cache = self.attention.extend(self.attention_norm(x), cache, positions=positions)
        x = x + attended.astype(jnp.float32)
        return self._mlp_residual(x), cache

    def _mlp_residual(self, x):
        return x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)


ATTENTION_DEFAULTS = {"window": 0, "rope_theta": 10000.0, "num_kv_heads": 0}
register_block("attention", defaults=ATTENTION_DEFAULTS)(TransformerBlock)
register_block("swa", defaults={**ATTENTION_DEFAULTS, "window": 256})(TransformerBlock)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Token positions [B, T] that restart at 0 wherever the segment id changes."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=1,
    )
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return (index - segment_start).astype(jnp.int32)


def _apply_block(block, x, positions, segment_ids):
    return block(x, positions=positions, segment_ids=segment_ids)


def _layer_key(layer_index: int, key: str) -> str:
    """Block aux key -> model aux key: 'aux_loss/x' -> 'aux_loss/layer_03/x', 'm' -> 'layer_03/m'.

    Auxiliary losses keep the 'aux_loss/' prefix in front so one prefix test finds them all.
    """
    if key.startswith(AUX_LOSS_PREFIX):
        return f"{AUX_LOSS_PREFIX}layer_{layer_index:02d}/{key[len(AUX_LOSS_PREFIX) :]}"
    return f"layer_{layer_index:02d}/{key}"


@register_model("lm")
class LanguageModel(nnx.Module):
    """Decoder-only LM; layer i is a block of kind block_pattern[i % len(block_pattern)]."""

    def __init__(self, model_config, *, rngs: nnx.Rngs):
        for key in ("vocab_size", "d_model", "num_layers"):
            if model_config[key] < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {model_config[key]}")
        if model_config.loss_chunk_size < 0:
            raise ConfigError(
                f"model.loss_chunk_size: must be >= 0 (0 = plain loss), "
                f"got {model_config.loss_chunk_size}"
            )
        pattern = tuple(model_config.block_pattern)
        if not pattern:
            raise ConfigError("model.block_pattern: must name at least one block kind")
        self.compute_dtype = compute_dtype_of(model_config)
        self.tie_embeddings = model_config.tie_embeddings
        self.remat = model_config.remat
        self.loss_chunk_size = model_config.loss_chunk_size
        self.block_kinds = tuple(pattern[i % len(pattern)] for i in range(model_config.num_layers))

        vocab_size, d_model = model_config.vocab_size, model_config.d_model
        init = nnx.initializers.normal(init_std_of(model_config))
        self.embedding = nnx.Embed(
            vocab_size,
            d_model,
            embedding_init=with_logical_axes(init, "vocab", "embed"),
            rngs=rngs,
        )
        self.blocks = nnx.List(
            [
                build_block(kind, model_config, layer_index=i, rngs=rngs)
                for i, kind in enumerate(self.block_kinds)
            ]
        )
        self.final_norm = RMSNorm(d_model, eps=model_config.norm_eps, rngs=rngs)
        if not self.tie_embeddings:
            self.lm_head = projection(
                d_model,
                vocab_size,
                std=init_std_of(model_config),
                axes=("embed", "vocab"),
                rngs=rngs,
            )

    def __call__(self, inputs, *, segment_ids=None, positions=None):
        """inputs [B, T] int -> (hidden [B, T, D] float32 after the final norm, aux dict).

        aux holds every block's entries, keyed 'aux_loss/layer_ii/<name>' (auxiliary
        losses) or 'layer_ii/<name>' (metrics).
        """
        x, aux, _ = self._run_blocks(inputs, segment_ids, positions)
        return self.final_norm(x), aux

    def block_inputs(self, inputs, *, positions=None) -> list[jax.Array]:
        """The residual stream entering each block, [B, T, D] float32 per block: what the
        evals probe a block with (`block.memory_writes`)."""
        return self._run_blocks(inputs, None, positions)[2]

    def _run_blocks(self, inputs, segment_ids, positions):
        """-> (the last block's output, aux, the input of every block)."""
        if positions is None:
            if segment_ids is None:
                positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
            else:
                positions = segment_positions(segment_ids)
        positions = positions.astype(jnp.int32)
        x = self.embedding(inputs).astype(jnp.float32)
        apply_block = nnx.remat(_apply_block) if self.remat else _apply_block
        aux, block_inputs = {}, []
        for layer_index, block in enumerate(self.blocks):
            block_inputs.append(x)
            x, block_aux = apply_block(block, x, positions, segment_ids)
            aux.update({_layer_key(layer_index, k): v for k, v in block_aux.items()})
        return x, aux, block_inputs

    def output_kernel(self) -> jax.Array:
        """The [D, V] matrix that maps hidden states to logits (embedding.T when tied)."""
        if self.tie_embeddings:
            return self.embedding.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, inputs, *, segment_ids=None, positions=None) -> jax.Array:
        """[B, T, V] float32 logits (materialised in full: for inspection and sampling)."""
        hidden, _ = self(inputs, segment_ids=segment_ids, positions=positions)
        return self._hidden_to_logits(hidden)

    def _hidden_to_logits(self, hidden) -> jax.Array:
        return jnp.einsum(
            "btd,dv->btv",
            hidden.astype(self.compute_dtype),
            self.output_kernel().astype(self.compute_dtype),
            preferred_element_type=jnp.float32,
        )

    def init_cache(self, batch_size: int, max_length: int) -> list:
        """Every block's decoding cache (a pytree of arrays), for sequences of up to
        `max_length` tokens."""
        return [block.init_cache(batch_size, max_length) for block in self.blocks]

    def extend(self, tokens, cache, *, positions) -> tuple[jax.Array, list]:
        """Run T new tokens [B, T] at `positions` [B, T] that follow the cached ones.

        Returns (logits [B, T, V] float32, new cache). With positions 0 .. T-1 on a fresh
        cache this is a prefill; T = 1 is one decoding step. Chaining extends over a
        sequence gives the logits of one `logits(sequence)` call (no segment ids: one
        sequence per row).
        """
        positions = positions.astype(jnp.int32)
        x = self.embedding(tokens).astype(jnp.float32)
        new_cache = []
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x, block_cache = block.extend(x, block_cache, positions=positions)
            new_cache.append(block_cache)
        return self._hidden_to_logits(self.final_norm(x)), new_cache

    def loss_terms(self, batch) -> dict[str, jax.Array]:
        """Float32 scalars: ce_sum, correct, count (masked tokens), aux_loss, and the blocks'
        aux entries. The training loss is ce_sum / count + aux_loss.

        batch: inputs, targets, mask [B, T]; optional segment_ids, positions [B, T].
        """
        hidden, aux = self(
            batch["inputs"], segment_ids=batch.get("segment_ids"), positions=batch.get("positions")
        )
        ce_sum, correct = cross_entropy_terms(
            hidden,
            self.output_kernel(),
            batch["targets"],
            batch["mask"],
            chunk_size=self.loss_chunk_size,
            compute_dtype=self.compute_dtype,
        )
        aux = {key: jnp.asarray(value, jnp.float32) for key, value in aux.items()}
        aux_loss = sum(
            (value for key, value in aux.items() if key.startswith(AUX_LOSS_PREFIX)),
            jnp.zeros((), jnp.float32),
        )
        return {
            "ce_sum": ce_sum,
            "correct": correct,
            "count": jnp.sum(batch["mask"].astype(jnp.float32)),
            "aux_loss": aux_loss,
            **aux,
        }
