"""Causal softmax attention with RoPE, optional sliding window, packed segments and GQA.

Split in parts so the training forward and cached decoding share the math:
`Attention.project` (x -> rotated q, k, v), `attention_mask` (which keys each query may
see, from token indices and segment ids) and `dot_product_attention` (the softmax core),
then `Attention.output` (heads -> residual stream). With a sliding window, longer sequences
go through `sliding_window_attention`, the same result in blocks, O(T * window). Decoding
(`Attention.init_cache`, `Attention.extend`) keeps rotated keys and values in a KV cache
and masks with `cache_attention_mask`, the same rule expressed on stored token positions.
Those functions live in `layers.attention_math` (context parallelism uses them too) and are
importable from here. With the mesh's "context" axis the layer runs
`layers.context_parallel`'s ring attention or halo exchange instead.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.attention_math import (  # noqa: F401 (re-exported: the layer's parts)
    attention_mask,
    cache_attention_mask,
    dot_product_attention,
    sliding_window_attention,
)
from layers.rope import apply_rope
from layers.sharding import projection


class Attention(nnx.Module):
    """Multi-head (or grouped-query) causal self-attention with RoPE, no biases.

    Projections are flattened [D, heads * head_dim] matrices (logical axes embed x qkv).
    Matmuls run in `dtype`; parameters are float32.
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        window: int,
        rope_theta: float,
        init_std: float,
        out_init_std: float,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of {num_kv_heads=}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window = window
        self.rope_theta = rope_theta
        self.dtype = dtype

        def linear(features_in, features_out, std, axes):
            return projection(features_in, features_out, std=std, axes=axes, dtype=dtype, rngs=rngs)

        self.query = linear(d_model, num_heads * head_dim, init_std, ("embed", "qkv"))
        self.key = linear(d_model, num_kv_heads * head_dim, init_std, ("embed", "qkv"))
        self.value = linear(d_model, num_kv_heads * head_dim, init_std, ("embed", "qkv"))
        self.out = linear(num_heads * head_dim, d_model, out_init_std, ("qkv", "embed"))

    def project(self, x: jax.Array, positions: jax.Array):
        """x [B, T, D] -> q [B, T, H, hd], k and v [B, T, K, hd]; q and k rotated by RoPE."""
        batch, length, _ = x.shape
        query = self.query(x).reshape(batch, length, self.num_heads, self.head_dim)
        key = self.key(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        value = self.value(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        query = apply_rope(query, positions, self.rope_theta)
        key = apply_rope(key, positions, self.rope_theta)
        return query, key, value

    def output(self, heads: jax.Array) -> jax.Array:
        """[B, T, H, hd] -> [B, T, D]."""
        return self.out(heads.reshape(*heads.shape[:2], self.num_heads * self.head_dim))

    def __call__(
        self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        query, key, value = self.project(x, positions)
        if context_parallel.context_size() > 1:  # T split over the mesh's "context" axis
            if self.window > 0:
                heads = context_parallel.halo_sliding_window_attention(
                    query, key, value, window=self.window, segment_ids=segment_ids
                )
            else:
                heads = context_parallel.ring_attention(query, key, value, segment_ids=segment_ids)
            return self.output(heads)
        if 0 < self.window and 2 * self.window < x.shape[1]:  # blocks pay off past 2 windows
            heads = sliding_window_attention(
                query, key, value, window=self.window, segment_ids=segment_ids
            )
            return self.output(heads)
        token_index = jnp.arange(x.shape[1])
        mask = attention_mask(
            token_index,
            token_index,
            window=self.window,
            query_segments=segment_ids,
            key_segments=segment_ids,
        )
        return self.output(dot_product_attention(query, key, value, mask))

    # Decoding with a KV cache. The cache is a dict of arrays:
    #   key, value     [B, S, K, hd] in the compute dtype, keys stored after RoPE;
    #   key_positions  [B, S] int32, the position of the token in each slot (-1: empty).
    # A token at position p lives in slot p mod S. For full attention S = max_length, so
    # positions must stay below max_length; with a window W, S = min(W, max_length) and the
    # cache is a ring buffer holding the last S tokens, which is all a query can see.

    def cache_size(self, max_length: int) -> int:
        return min(self.window, max_length) if self.window > 0 else max_length

    def init_cache(self, batch_size: int, max_length: int) -> dict[str, jax.Array]:
        size = self.cache_size(max_length)
        shape = (batch_size, size, self.num_kv_heads, self.head_dim)
        return {
            "key": jnp.zeros(shape, self.dtype),
            "value": jnp.zeros(shape, self.dtype),
            "key_positions": jnp.full((batch_size, size), -1, jnp.int32),
        }

    def extend(
        self, x: jax.Array, cache: dict[str, jax.Array], *, positions: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Attend T new tokens x [B, T, D] at `positions` [B, T] to themselves and the cache.

        Equals `__call__` on the whole sequence restricted to the new rows, provided the
        positions are consecutive and follow the cached ones. Returns ([B, T, D], new cache).
        """
        query, key, value = self.project(x, positions)
        if self.window > 0 and x.shape[1] > 1:
            # A new token may overwrite a ring slot whose key an earlier new query still
            # sees, so attend over [cache || new] first, then write (keeping the last S).
            keys = jnp.concatenate([cache["key"], key], axis=1)
            values = jnp.concatenate([cache["value"], value], axis=1)
            key_positions = jnp.concatenate([cache["key_positions"], positions], axis=1)
            mask = cache_attention_mask(positions, key_positions, window=self.window)
            heads = dot_product_attention(query, keys, values, mask)
            return self.output(heads), write_cache(cache, key, value, positions)
        # Writing first is exact here: a full cache never overwrites a slot in use, and a
        # single token only overwrites a key that has just left its window.
        cache = write_cache(cache, key, value, positions)
        mask = cache_attention_mask(positions, cache["key_positions"], window=self.window)
        heads = dot_product_attention(query, cache["key"], cache["value"], mask)
        return self.output(heads), cache


def write_cache(cache, key, value, positions):
    """Store k, v [B, T, K, hd] of tokens at `positions` [B, T] in slots position mod S.

    Only the last S tokens are written (earlier ones would be overwritten anyway, and a
    scatter with repeated slots has no defined order).
    """
    size = cache["key_positions"].shape[1]
    key, value, positions = key[:, -size:], value[:, -size:], positions[:, -size:]
    slots = positions % size
    rows = jnp.arange(positions.shape[0])[:, None]
    return {
        "key": cache["key"].at[rows, slots].set(key.astype(cache["key"].dtype)),
        "value": cache["value"].at[rows, slots].set(value.astype(cache["value"].dtype)),
        "key_positions": cache["key_positions"].at[rows, slots].set(positions.astype(jnp.int32)),
    }
