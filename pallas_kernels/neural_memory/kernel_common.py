"""What the deep-memory TPU and GPU kernels share: layouts and the `jax.custom_vjp` around them.

The public layout `[B, T, H, D]` becomes the kernels' `[B, H, T', D]`, T' a whole number of
chunks. Padding follows `chunked.py`: q = k = v = theta = g = 0, eta = 1 (finite, so nothing
NaN leaks); padded tokens do move the memory (with momentum no token is neutral), so the
final chunk's state is read at its last real token, `KernelConfig.last_row`. Per-token
scalars theta, eta, g go in as float32 `[B, H, T']`.

The state (a `NeuralMemoryState` with leaves W1 [B, H, D, E·D], W2 [B, H, E·D, D] and their
momenta) travels as one float32 `[B, H, 4, D, E·D]` array: W1, W2^T, S1, S2^T
(`pack_state` / `unpack_state`), so a kernel holds a single state buffer.

A backend supplies `forward(config, q, k, v, lr, eta, g, state, save_states) -> (o, final,
chunk_states | None)` and `backward(config, q, k, v, lr, eta, g, chunk_states, d_o,
d_final) -> (dq, dk, dv, dlr, deta, dg, d_state)`; chunk_states `[B, H, N, 4, D, E·D]` are
the states entering each chunk, saved by the forward so the backward recomputes every chunk
independently (N · 4 · D · E·D · 4 bytes per (batch, head): 512 MiB at T = 64K, chunk 16,
D = 64, E = 2 -- use larger chunks for long sequences).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.neural_memory.choices import NeuralMemoryState
from pallas_kernels.pallas_blocks import PRECISION, LaunchOptions


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig(LaunchOptions):
    """Static description of one kernel call (hashable: a custom_vjp static argument).

    last_row: index in the final chunk of the last real token ((T - 1) mod chunk_size).
    """

    chunk_size: int
    last_row: int
    activation: str
    norm_eps: float


def pack_state(state: NeuralMemoryState):
    """NeuralMemoryState (momentum rule, mlp depth 2) -> float32 [B, H, 4, D, E·D]."""
    weights, momentum = state.weights, state.momentum
    leaves = (
        weights["W1"],
        jnp.swapaxes(weights["W2"], -1, -2),
        momentum["W1"],
        jnp.swapaxes(momentum["W2"], -1, -2),
    )
    return jnp.stack([leaf.astype(jnp.float32) for leaf in leaves], axis=2)


def unpack_state(packed) -> NeuralMemoryState:
    """Inverse of `pack_state`."""
    w1, w2t, s1, s2t = (packed[:, :, index] for index in range(4))
    weights = {"W1": w1, "W2": jnp.swapaxes(w2t, -1, -2)}
    momentum = {"W1": s1, "W2": jnp.swapaxes(s2t, -1, -2)}
    return NeuralMemoryState(weights, momentum)


def _to_kernel_layout(x, padded_length, pad_value, dtype=None):
    """[B, T, H, ...] -> [B, H, T', ...], padded along time with `pad_value`."""
    if dtype is not None:
        x = x.astype(dtype)
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, padded_length - x.shape[1])
    return jnp.moveaxis(jnp.pad(x, pad, constant_values=pad_value), 2, 1)


def make_recurrence(forward, backward):
    """Wrap a backend's forward / backward kernels into a differentiable recurrence."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def kernel(config, q, k, v, lr, eta, log_decay, state):
        o, final_state, _ = forward(config, q, k, v, lr, eta, log_decay, state, False)
        return o, final_state

    def kernel_fwd(config, q, k, v, lr, eta, log_decay, state):
        o, final_state, chunk_states = forward(config, q, k, v, lr, eta, log_decay, state, True)
        return (o, final_state), (q, k, v, lr, eta, log_decay, chunk_states)

    def kernel_bwd(config, residuals, cotangents):
        q, k, v, lr, eta, log_decay, chunk_states = residuals
        d_o, d_final_state = cotangents
        dq, dk, dv, d_lr, d_eta, d_decay, d_state = backward(
            config, q, k, v, lr, eta, log_decay, chunk_states, d_o, d_final_state
        )
        d_inputs = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
        return d_inputs + (d_lr, d_eta, d_decay, d_state)

    kernel.defvjp(kernel_fwd, kernel_bwd)

    def recurrence(spec, q, k, v, lr, eta, log_decay, initial_state, *, block_sizes, interpret):
        """`chunked.chunked_scan`'s arguments and results, run by the kernels."""
        length = q.shape[1]
        chunk_size = block_sizes.chunk_size
        padded = -(-length // chunk_size) * chunk_size
        config = KernelConfig(
            chunk_size=chunk_size,
            last_row=(length - 1) % chunk_size,
            activation=spec.activation,
            norm_eps=float(spec.norm_eps),
            num_warps=block_sizes.num_warps,
            num_stages=block_sizes.num_stages,
            interpret=bool(interpret),
        )
        if log_decay is None:
            log_decay = jnp.zeros(lr.shape, jnp.float32)
        q, k, v = (_to_kernel_layout(x, padded, 0.0) for x in (q, k, v))
        f32 = jnp.float32
        lr, log_decay = (_to_kernel_layout(x, padded, 0.0, f32) for x in (lr, log_decay))
        eta = _to_kernel_layout(eta, padded, 1.0, f32)
        o, final_state = kernel(config, q, k, v, lr, eta, log_decay, pack_state(initial_state))
        return jnp.moveaxis(o, 1, 2)[:, :length], unpack_state(final_state)

    return recurrence


def cost_estimate(q, state, chunk_size, *, backward):
    """(flops, transcendentals, bytes) of the chunked algorithm, for `pl.CostEstimate`.

    Per chunk of b tokens with hidden width F = E·D: 13 matmuls of b x D x F (memory on keys,
    backprop, retrieval, 4 state updates), 2 of b x b x F, 2 of b x b x D and ~2 log2(b) of
    b x b x b (coefficients); the backward (recompute + VJP) is about 3x that.
    """
    batch_size, num_heads, length, dim = q.shape
    hidden = state.shape[-1]
    b = chunk_size
    per_chunk = 2 * (13 * b * dim * hidden + 2 * b * b * hidden + 2 * b * b * dim)
    per_chunk += 2 * 2 * max(1, b.bit_length() - 1) * b**3
    flops = batch_size * num_heads * (length // b) * per_chunk
    transcendentals = batch_size * num_heads * length * (4 * hidden + 2 * b)
    io_bytes = 4 * q.size * q.dtype.itemsize + 2 * state.size * 4
    io_bytes += (length // b) * state.size * 4  # saved chunk-start states
    if backward:
        flops, transcendentals, io_bytes = 3 * flops, 2 * transcendentals, 2 * io_bytes
    return int(flops), int(transcendentals), int(io_bytes)


def static_options(config):
    """The static keyword arguments of `kernel_math.chunk_step` (and its backward)."""
    return dict(activation=config.activation, norm_eps=config.norm_eps, precision=PRECISION)


def last_row(config, is_final_chunk):
    """Row whose state leaves the chunk: the last real token in the final chunk."""
    # Integer arithmetic, not `where`: Triton's lowering mixes the bool and int types here.
    shortfall = config.chunk_size - 1 - config.last_row
    return config.chunk_size - 1 - shortfall * is_final_chunk.astype(jnp.int32)


def pallas_cost(q, state, config, *, backward):
    """`cost_estimate` as the `pl.CostEstimate` both kernels pass to `pallas_call`."""
    flops, transcendentals, io_bytes = cost_estimate(q, state, config.chunk_size, backward=backward)
    return pl.CostEstimate(flops=flops, transcendentals=transcendentals, bytes_accessed=io_bytes)
