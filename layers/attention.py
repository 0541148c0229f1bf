"""Causal softmax attention with RoPE, optional sliding window, packed segments and GQA.

Split in three so a KV cache can be added later without touching the math:
`Attention.project` (x -> rotated q, k, v), `attention_mask` (which keys each query may
see, from token indices and segment ids) and `dot_product_attention` (the softmax core),
then `Attention.output` (heads -> residual stream).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from layers.rope import apply_rope
from layers.sharding import with_logical_axes


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

        def linear(features_in, features_out, std, axes):
            return nnx.Linear(
                features_in,
                features_out,
                use_bias=False,
                dtype=dtype,
                kernel_init=with_logical_axes(nnx.initializers.normal(std), *axes),
                rngs=rngs,
            )

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
        token_index = jnp.arange(x.shape[1])
        mask = attention_mask(
            token_index,
            token_index,
            window=self.window,
            query_segments=segment_ids,
            key_segments=segment_ids,
        )
        return self.output(dot_product_attention(query, key, value, mask))
