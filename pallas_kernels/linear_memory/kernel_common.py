"""What the TPU and GPU kernels share: input layout and the `jax.custom_vjp` around them.

The public layout `[B, T, H, D]` is turned into the kernels' `[B, H, T', D]` (T' a whole
number of chunks; padding tokens have q = k = v = 0, g = 0, β = 0 and leave the state
unchanged). Per-token scalars go in as float32 `[B, H, T']`:

    g  log decay (0 without decay; the kernels then skip the decay math: has_decay)
    r  in-chunk reset count  (number of segment starts at or before i in the chunk)
    β  delta-rule step size (0 for additive rules, which ignore it)

r is a constant (its cotangent is zero).

A backend supplies `forward(config, q, k, v, g, r, β, S_0) -> (o, S_T, chunk_states)` and
`backward(config, q, k, v, g, r, β, chunk_states, do, dS_T) -> (dq, dk, dv, dg, dβ, dS_0)`,
where chunk_states `[B, H, N, Dk, Dv]` are the states entering each chunk, saved by the
forward so the backward can recompute every chunk independently.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.linear_memory.reference import segment_resets
from pallas_kernels.pallas_blocks import PRECISION, LaunchOptions


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig(LaunchOptions):
    """Static description of one kernel call (hashable: it is a custom_vjp static arg)."""

    scale: float
    has_decay: bool
    has_delta: bool
    chunk_size: int


def _to_kernel_layout(x, padded_length):
    """[B, T, H, ...] -> [B, H, T', ...], zero-padded along time."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, padded_length - x.shape[1])
    return jnp.moveaxis(jnp.pad(x, pad), 2, 1)


def _in_chunk_cumsum(x, chunk_size):
    """Cumulative sum restarted at every chunk, along the last axis of [B, H, T']."""
    shape = x.shape
    x = x.reshape(*shape[:-1], shape[-1] // chunk_size, chunk_size)
    return jnp.cumsum(x, axis=-1).reshape(shape)


def make_recurrence(forward, backward):
    """Wrap a backend's forward / backward kernels into a differentiable recurrence."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def kernel(config, q, k, v, log_decay, resets, beta, initial_state):
        o, final_state, _ = forward(config, q, k, v, log_decay, resets, beta, initial_state)
        return o, final_state

    def kernel_fwd(config, q, k, v, log_decay, resets, beta, initial_state):
        o, final_state, chunk_states = forward(
            config, q, k, v, log_decay, resets, beta, initial_state, save_states=True
        )
        return (o, final_state), (q, k, v, log_decay, resets, beta, chunk_states)

    def kernel_bwd(config, residuals, cotangents):
        q, k, v, log_decay, resets, beta, chunk_states = residuals
        d_o, d_final_state = cotangents
        dq, dk, dv, d_decay, d_beta, d_initial = backward(
            config, q, k, v, log_decay, resets, beta, chunk_states, d_o, d_final_state
        )
        return (
            dq.astype(q.dtype),
            dk.astype(k.dtype),
            dv.astype(v.dtype),
            d_decay,
            jnp.zeros_like(resets),
            d_beta,
            d_initial,
        )

    kernel.defvjp(kernel_fwd, kernel_bwd)

    def recurrence(q, k, v, g, beta, *, scale, initial_state, segment_ids, block_sizes, interpret):
        """Same arguments and results as `reference.recurrence`, run by the kernels."""
        batch_size, length, num_heads, key_dim = q.shape
        value_dim = v.shape[-1]
        chunk_size = block_sizes.chunk_size
        padded = -(-length // chunk_size) * chunk_size
        f32 = jnp.float32
        config = KernelConfig(
            scale=float(scale),
            has_decay=g is not None,
            has_delta=beta is not None,
            chunk_size=chunk_size,
            num_warps=block_sizes.num_warps,
            num_stages=block_sizes.num_stages,
            interpret=interpret,
        )
        per_token = (batch_size, length, num_heads)
        g = jnp.zeros(per_token, f32) if g is None else g.astype(f32)
        beta = jnp.zeros(per_token, f32) if beta is None else beta.astype(f32)
        resets = segment_resets(segment_ids, batch_size, length).astype(f32)
        resets = jnp.broadcast_to(resets[:, :, None], per_token)
        q, k, v = (_to_kernel_layout(x, padded) for x in (q, k, v))
        g, beta, resets = (_to_kernel_layout(x, padded) for x in (g, beta, resets))
        resets = _in_chunk_cumsum(resets, chunk_size)
        if initial_state is None:
            initial_state = jnp.zeros((batch_size, num_heads, key_dim, value_dim), f32)
        o, final_state = kernel(config, q, k, v, g, resets, beta, initial_state.astype(f32))
        return jnp.moveaxis(o, 1, 2)[:, :length], final_state

    return recurrence


def static_options(config):
    """The static keyword arguments of `kernel_math.chunk_forward` (and its backward)."""
    return dict(
        scale=config.scale,
        has_decay=config.has_decay,
        has_delta=config.has_delta,
        precision=PRECISION,
    )


def cost_estimate(config, q, v, *, backward):
    """Flops and bytes of the chunked algorithm, for `pl.CostEstimate` (XLA's scheduler).

    Per chunk: ~5 C x C x D matmuls and 3 C x D x D ones forward (delta rules add the
    C x C x C substitution and 3 more); the backward is about 2.5x that.
    """
    batch_size, num_heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    chunk = config.chunk_size
    per_chunk = 2 * chunk * chunk * (2 * key_dim + 3 * value_dim)
    per_chunk += 2 * 3 * chunk * key_dim * value_dim
    if config.has_delta:
        per_chunk += 2 * chunk**3 + 2 * 3 * chunk * chunk * (key_dim + value_dim)
    flops = batch_size * num_heads * (length // chunk) * per_chunk
    transcendentals = batch_size * num_heads * length * (2 * chunk + 3)
    io_bytes = q.size * q.dtype.itemsize * 2 + v.size * v.dtype.itemsize * 2
    io_bytes += batch_size * num_heads * length * 4 * 3
    if backward:
        flops, transcendentals, io_bytes = int(2.5 * flops), 2 * transcendentals, 2 * io_bytes
    return flops, transcendentals, io_bytes
