"""Causal softmax attention with RoPE, optional sliding window, packed segments and GQA.

Split in parts so the training forward and cached decoding share the math:
`Attention.project` (x -> rotated q, k, v), `attention_mask` (which keys each query may
see, from token indices and segment ids) and `dot_product_attention` (the softmax core),
then `Attention.output` (heads -> residual stream). With a sliding window, longer sequences
go through `sliding_window_attention`, the same result in blocks, O(T * window). Decoding
(`Attention.init_cache`, `Attention.extend`) keeps rotated keys and values in a KV cache
and masks with `cache_attention_mask`, the same rule expressed on stored token positions.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.rope import apply_rope
from layers.sharding import projection


def attention_mask(
    query_index: jax.Array,
    key_index: jax.Array,
    *,
    window: int = 0,
    query_segments: jax.Array | None = None,
    key_segments: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B or 1, Tq, Tk]: causal & within the window & same segment.

    query_index [Tq] / key_index [Tk] are the tokens' indices in the (packed) sequence.
    With `window > 0` a query sees the `window` most recent keys, itself included
    (0 <= i - j < window); `window = 0` means unbounded. Segment ids [B, Tq] / [B, Tk] keep
    packed documents apart (`key_segments` defaults to `query_segments`). A query always
    sees itself, so no row of the mask is empty.
    """
    distance = query_index[:, None] - key_index[None, :]
    mask = distance >= 0
    if window > 0:
        mask = mask & (distance < window)
    mask = mask[None]
    if query_segments is not None:
        key_segments = query_segments if key_segments is None else key_segments
        mask = mask & (query_segments[:, :, None] == key_segments[:, None, :])
    return mask


def cache_attention_mask(
    query_positions: jax.Array, key_positions: jax.Array, *, window: int = 0
) -> jax.Array:
    """Boolean mask [B, Tq, Tk] for decoding: the key is stored & causal & within the window.

    The rule of `attention_mask`, on positions rather than indices, because cache slots are
    not in token order (a sliding-window cache is a ring buffer). query_positions [B, Tq],
    key_positions [B, Tk]; a key position < 0 marks an empty slot.
    """
    distance = query_positions[:, :, None] - key_positions[:, None, :]
    mask = (key_positions[:, None, :] >= 0) & (distance >= 0)
    if window > 0:
        mask = mask & (distance < window)
    return mask


def dot_product_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array
) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017, eq. 1), grouped-query.

    query [B, Tq, H, D]; key, value [B, Tk, K, D] with H a multiple of K (query head h uses
    key/value head h // (H / K), as in GQA, Ainslie et al. 2023); mask bool [B or 1, Tq, Tk].
    Scores and softmax in float32; the weighted sum of values takes value.dtype inputs,
    accumulates in float32 and is returned in value.dtype.
    """
    batch, query_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    group = num_heads // num_kv_heads
    grouped_query = query.reshape(batch, query_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", grouped_query, key, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probabilities = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probabilities, value, preferred_element_type=jnp.float32)
    return out.reshape(batch, query_len, num_heads, head_dim).astype(value.dtype)


def sliding_window_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    window: int,
    segment_ids: jax.Array | None = None,
    prefix_key: jax.Array | None = None,
    prefix_value: jax.Array | None = None,
) -> jax.Array:
    """Causal attention over the `window` most recent keys in O(T * window), not O(T^2).

    Same result as `dot_product_attention` with `attention_mask(..., window=window)` (the
    tests hold it to that): T is cut into blocks of `window` queries; a query in block i can
    only see keys in blocks i - 1 and i, so each block attends over those 2 * window keys
    with the same mask rule on their token indices (keys before the sequence start, from
    the zero padding of block -1, and padding at the end are masked or discarded).
    query [B, T, H, D], key / value [B, T, K, D], segment_ids [B, T] or None; prefix_key /
    prefix_value [B, P, K, D] or None: keys every query sees (Titans' persistent memory),
    in front of each block's keys.
    """
    batch, length = query.shape[:2]
    num_blocks = -(-length // window)
    padded = num_blocks * window

    def blocks(x, fill=0):  # [B, T, ...] -> [B, num_blocks, window, ...], zero padded
        padding = [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2)
        x = jnp.pad(x, padding, constant_values=fill)
        return x.reshape(batch, num_blocks, window, *x.shape[2:])

    def with_previous_block(x):  # [B, n, W, ...] -> [B, n, 2W, ...]: blocks i - 1 and i
        previous = jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-1]
        return jnp.concatenate([previous, x], axis=2)

    def fold(x):  # [B, n, ...] -> [B * n, ...]
        return x.reshape(batch * num_blocks, *x.shape[2:])

    starts = jnp.arange(num_blocks) * window
    query_index = starts[:, None] + jnp.arange(window)  # [n, W]
    key_index = starts[:, None] - window + jnp.arange(2 * window)  # [n, 2W]
    mask = jax.vmap(lambda q, k: attention_mask(q, k, window=window)[0])(query_index, key_index)
    mask = mask & (key_index >= 0)[:, None, :]  # [n, W, 2W]
    mask = jnp.broadcast_to(mask[None], (batch, *mask.shape))
    if segment_ids is not None:
        query_segments = blocks(segment_ids, fill=-1)
        key_segments = with_previous_block(query_segments)
        mask = mask & (query_segments[..., :, None] == key_segments[..., None, :])
    keys, values = with_previous_block(blocks(key)), with_previous_block(blocks(value))
    if prefix_key is not None:

        def in_front(prefix, x):  # [B, P, ...] before each block's [B, n, 2W, ...]
            prefix = jnp.broadcast_to(prefix[:, None], (batch, num_blocks, *prefix.shape[1:]))
            return jnp.concatenate([prefix.astype(x.dtype), x], axis=2)

        keys, values = in_front(prefix_key, keys), in_front(prefix_value, values)
        always = jnp.ones(mask.shape[:3] + (prefix_key.shape[1],), bool)
        mask = jnp.concatenate([always, mask], axis=-1)
    out = dot_product_attention(fold(blocks(query)), fold(keys), fold(values), fold(mask))
    return out.reshape(batch, padded, *out.shape[2:])[:, :length]


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
