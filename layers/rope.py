"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer", eq. 34).

Feature pairs (x_i, x_{i + d/2}) are rotated by the angle `position * theta^(-2i/d)`
(the "rotate half" layout of GPT-NeoX / Llama), so the dot product of a rotated query at
position m and a rotated key at position n depends on m - n only.
"""

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """theta^(-2i/d) for i = 0 .. d/2 - 1, float32 [head_dim // 2]."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return theta**-exponents


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate `x` [B, T, H, D] by `positions` [B, T]; computed in float32, returned in x.dtype."""
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, D/2], broadcast over heads
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = x32[..., : head_dim // 2], x32[..., head_dim // 2 :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
