"""The softmax attention core as plain functions, shared by `layers.attention` (the layer,
its KV cache) and `layers.context_parallel` (ring attention, halo exchange):
`attention_mask` (which keys each query may see, from token indices and segment ids),
`cache_attention_mask` (the same rule on stored token positions), `dot_product_attention`
(the softmax, grouped-query) and `sliding_window_attention` (the same result in blocks,
O(T * window)).
"""

import jax
import jax.numpy as jnp


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
