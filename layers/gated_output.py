"""The output block of the memory mixers (Gated DeltaNet §3.4, fla's FusedRMSNormGated):
shared by `LinearMemory`, `MixtureOfMemories`, `NeuralMemory` and MAC's retrieval path."""

import jax
import jax.numpy as jnp
from flax import nnx

from layers.cpu_layouts import materialised_cotangent
from layers.norms import rms_norm
from layers.sharding import projection, with_logical_axes


class GatedOutput(nnx.Module):
    """y = (RMSNorm(o) ⊙ SiLU(x W_gate)) W_out, RMSNorm over each head's Dv (one shared scale,
    as fla's FusedRMSNormGated); W_out uses `out_init_std` (it writes the residual stream).
    norm=False leaves the RMSNorm out: y = (o ⊙ SiLU(x W_gate)) W_out."""

    def __init__(
        self, d_model, num_heads, value_dim, *, eps, init_std, out_init_std, dtype, rngs, norm=True
    ):
        def linear(features_in, features_out, std, axes):
            return projection(features_in, features_out, std=std, axes=axes, dtype=dtype, rngs=rngs)

        self.gate = linear(d_model, num_heads * value_dim, init_std, ("embed", "qkv"))
        self.out = linear(num_heads * value_dim, d_model, out_init_std, ("qkv", "embed"))
        if norm:
            self.norm_scale = nnx.Param(
                with_logical_axes(nnx.initializers.ones, "norm")(None, (value_dim,), jnp.float32)
            )
        self.norm, self.eps = norm, eps
        self.dtype = dtype

    def __call__(self, o: jax.Array, x: jax.Array) -> jax.Array:
        """o [B, T, H, Dv] (memory readout), x [B, T, D] (the mixer input) -> [B, T, D]."""
        # The gate's backward reads o's (transposed) scan outputs: `layers.cpu_layouts`.
        gate = materialised_cotangent(self.gate(x)).reshape(o.shape).astype(jnp.float32)
        if self.norm:
            o = rms_norm(o, self.norm_scale[...], self.eps)
        normed = o.astype(jnp.float32) * jax.nn.silu(gate)
        return self.out(normed.reshape(*o.shape[:2], -1).astype(self.dtype))
