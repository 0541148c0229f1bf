"""Feed-forward layers."""

import jax
import jax.numpy as jnp
from flax import nnx

from layers.sharding import projection


def swiglu_hidden_dim(d_model: int, multiple_of: int = 32) -> int:
    """Default SwiGLU width: 8/3 * d_model (same parameter count as a 4x GELU MLP), rounded
    to the nearest multiple of `multiple_of` (at least one multiple)."""
    return max(multiple_of, multiple_of * round(8 * d_model / 3 / multiple_of))


class SwiGLU(nnx.Module):
    """SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6):
    FFN(x) = (SiLU(x W_gate) * (x W_up)) W_down, without biases.

    `out_init_std` lets the caller shrink the init of the projection back into the residual
    stream (see `models.lm`); matmuls run in `dtype`, parameters are float32.
    """

    def __init__(
        self,
        d_model: int,
        hidden_dim: int,
        *,
        init_std: float,
        out_init_std: float | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_std = init_std if out_init_std is None else out_init_std

        def linear(features_in, features_out, std, axes):
            return projection(features_in, features_out, std=std, axes=axes, dtype=dtype, rngs=rngs)

        self.gate = linear(d_model, hidden_dim, init_std, ("embed", "mlp"))
        self.up = linear(d_model, hidden_dim, init_std, ("embed", "mlp"))
        self.down = linear(hidden_dim, d_model, out_std, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
