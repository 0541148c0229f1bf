"""Normalisation layers."""

import jax
import jax.numpy as jnp
from flax import nnx

from layers.sharding import with_logical_axes


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019, eq. 4): y = x / sqrt(mean(x^2) + eps) * g, in float32."""
    x32 = x.astype(jnp.float32)
    inverse_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return x32 * inverse_rms * scale.astype(jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(‖x‖² + eps) over the last axis, in float32 (fla's l2norm), cast back."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned per-feature scale (initialised to 1).

    The statistics are always computed in float32; the result is cast to `dtype`
    (the dtype of the computation that consumes it), float32 by default.
    """

    def __init__(self, features: int, *, eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs  # deterministic initialisation; the argument keeps the layer API uniform
        self.scale = nnx.Param(
            with_logical_axes(nnx.initializers.ones, "norm")(None, (features,), jnp.float32)
        )
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps).astype(self.dtype)
