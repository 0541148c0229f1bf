"""Pallas Triton (GPU) kernels for the chunked matrix-memory recurrences, forward and backward.

One program per (batch, head) walks all chunks with `lax.fori_loop`, carrying the
`[Dk, Dv]` float32 state in registers; each iteration runs `kernel_math.chunk_forward` on
one chunk (the same math as the TPU kernel). The forward also writes the state entering
each chunk, so the backward can walk the chunks in reverse, carrying the state gradient
dS, and recompute each chunk from its saved state.

Triton needs every loaded block to have a power-of-2 size: the chunk size, Dk and Dv must be
powers of 2 (`api.py` only routes such shapes here). Per-token scalars are `[B, H, T']`
vectors, loaded per chunk as `[C]` and viewed as a column `[C, 1]` and a row `[1, C]`.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.linear_memory import kernel_common, kernel_math
from pallas_kernels.pallas_blocks import (
    float32_tokens,
    gpu_chunk_scalars,
    gpu_compiler_params,
    gpu_grid,
    gpu_per_program,
)


def forward(config, q, k, v, log_decay, resets, beta, initial_state, save_states=False):
    """Kernel layout in (see kernel_common); returns (o, final state, chunk states | None)."""
    key_dim, value_dim, chunk = q.shape[-1], v.shape[-1], config.chunk_size
    grid, length, num_chunks = gpu_grid(q, chunk)
    token_specs = [gpu_per_program((length, width)) for width in (key_dim, key_dim, value_dim)]

    def kernel(q_ref, k_ref, v_ref, decay_ref, resets_ref, beta_ref, initial_ref, *outs):
        o_ref, final_ref = outs[:2]

        def chunk_step(n, state):
            rows = pl.ds(n * chunk, chunk)
            if save_states:
                outs[2][n] = state
            o, next_state = kernel_math.chunk_forward(
                *float32_tokens((q_ref, k_ref, v_ref), rows),
                state,
                gpu_chunk_scalars((decay_ref, resets_ref, beta_ref), rows),
                **kernel_common.static_options(config),
            )
            o_ref[rows, :] = o.astype(o_ref.dtype)
            return next_state

        final_ref[...] = jax.lax.fori_loop(0, num_chunks, chunk_step, initial_ref[...])

    out_shape = [
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct(initial_state.shape, jnp.float32),
    ]
    out_specs = [gpu_per_program((length, value_dim)), gpu_per_program((key_dim, value_dim))]
    if save_states:
        states_shape = (num_chunks, key_dim, value_dim)
        out_shape.append(jax.ShapeDtypeStruct((*grid, *states_shape), jnp.float32))
        out_specs.append(gpu_per_program(states_shape))
    flops, transcendentals, io_bytes = kernel_common.cost_estimate(config, q, v, backward=False)
    outputs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=token_specs
        + [gpu_per_program((length,))] * 3
        + [gpu_per_program((key_dim, value_dim))],
        out_specs=out_specs,
        compiler_params=gpu_compiler_params(config),
        cost_estimate=pl.CostEstimate(
            flops=flops, transcendentals=transcendentals, bytes_accessed=io_bytes
        ),
        interpret=config.interpret,
        name="linear_memory_forward_gpu",
    )(q, k, v, log_decay, resets, beta, initial_state)
    return outputs[0], outputs[1], (outputs[2] if save_states else None)


def backward(config, q, k, v, log_decay, resets, beta, chunk_states, d_o, d_final_state):
    """Reverse chunk loop; returns (dq, dk, dv, dg, dβ, dS_0), all float32."""
    key_dim, value_dim, chunk = q.shape[-1], v.shape[-1], config.chunk_size
    grid, length, num_chunks = gpu_grid(q, chunk)
    token_specs = [gpu_per_program((length, width)) for width in (key_dim, key_dim, value_dim)]

    def kernel(q_ref, k_ref, v_ref, decay_ref, resets_ref, beta_ref, states_ref, *refs):
        d_o_ref, d_final_ref, dq_ref, dk_ref, dv_ref, d_decay_ref, d_beta_ref = refs[:7]
        d_initial_ref = refs[7]

        def chunk_step(step, d_state):
            n = num_chunks - 1 - step
            rows = pl.ds(n * chunk, chunk)
            dq, dk, dv, d_decay_col, d_decay_row, d_beta, d_state = kernel_math.chunk_backward(
                *float32_tokens((q_ref, k_ref, v_ref), rows),
                states_ref[n],
                d_o_ref[rows, :].astype(jnp.float32),
                d_state,
                gpu_chunk_scalars((decay_ref, resets_ref, beta_ref), rows),
                **kernel_common.static_options(config),
            )
            dq_ref[rows, :], dk_ref[rows, :], dv_ref[rows, :] = dq, dk, dv
            d_decay_ref[rows] = d_decay_col.reshape(chunk) + d_decay_row.reshape(chunk)
            d_beta_ref[rows] = d_beta.reshape(chunk)
            return d_state

        d_initial_ref[...] = jax.lax.fori_loop(0, num_chunks, chunk_step, d_final_ref[...])

    f32 = jnp.float32
    scalar_block = gpu_per_program((length,))
    flops, transcendentals, io_bytes = kernel_common.cost_estimate(config, q, v, backward=True)
    dq, dk, dv, d_decay, d_beta, d_initial = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, f32),
            jax.ShapeDtypeStruct(k.shape, f32),
            jax.ShapeDtypeStruct(v.shape, f32),
            jax.ShapeDtypeStruct(log_decay.shape, f32),
            jax.ShapeDtypeStruct(beta.shape, f32),
            jax.ShapeDtypeStruct(d_final_state.shape, f32),
        ],
        grid=grid,
        in_specs=token_specs
        + [scalar_block] * 3
        + [
            gpu_per_program((num_chunks, key_dim, value_dim)),
            gpu_per_program((length, value_dim)),
            gpu_per_program((key_dim, value_dim)),
        ],
        out_specs=token_specs + [scalar_block] * 2 + [gpu_per_program((key_dim, value_dim))],
        compiler_params=gpu_compiler_params(config),
        cost_estimate=pl.CostEstimate(
            flops=flops, transcendentals=transcendentals, bytes_accessed=io_bytes
        ),
        interpret=config.interpret,
        name="linear_memory_backward_gpu",
    )(q, k, v, log_decay, resets, beta, chunk_states, d_o, d_final_state)
    return dq, dk, dv, d_decay, d_beta, d_initial


recurrence = kernel_common.make_recurrence(forward, backward)
