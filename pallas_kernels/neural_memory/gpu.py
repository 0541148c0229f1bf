"""Pallas Triton (GPU) kernels for the chunked Titans deep-memory update, forward and backward.

One program per (batch, head) walks all chunks with `lax.fori_loop`, carrying the float32
state -- W1, W2^T, S1, S2^T, four `[D, E·D]` matrices -- in registers; each iteration runs
`kernel_math.chunk_step` on one chunk (the same math as the TPU kernel). The forward also
writes the state entering each chunk, so the backward can walk the chunks in reverse,
carrying the state gradient, and recompute each chunk from its saved state before taking
its VJP (`kernel_math.chunk_step_backward`).

On chip: the carried state is 4 D·E·D floats (8 D^2 at E = 2): 2K at D = 16, 8K at D = 32
-- 16 / 64 registers per thread with 4 warps, so it stays in registers; at D = 64 (32K
floats) Triton spills part of it to local memory (cached in L1/L2), which works but is
slower, and the backward's carried gradient doubles that. `kernel_api` sends only D <= 32 to
this kernel under impl="auto".

Triton needs every block to have power-of-2 sides and dot operands with sides >= 16: the
chunk size, D and E·D must be powers of 2, at least 16. Per-token scalars are `[B, H, T']`
vectors, loaded per chunk as `[b]` and viewed as a column `[b, 1]` and a row `[1, b]`.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.neural_memory import kernel_common, kernel_math
from pallas_kernels.pallas_blocks import (
    float32_tokens,
    gpu_chunk_scalars,
    gpu_compiler_params,
    gpu_grid,
    gpu_per_program,
)


def forward(config, q, k, v, lr, eta, log_decay, state, save_states=False):
    """Kernel layout in (see kernel_common); returns (o, final state, chunk states | None)."""
    dim, state_shape, chunk = q.shape[-1], state.shape[2:], config.chunk_size
    grid, length, num_chunks = gpu_grid(q, chunk)

    def kernel(q_ref, k_ref, v_ref, lr_ref, eta_ref, decay_ref, initial_ref, *outs):
        o_ref, final_ref = outs[:2]

        def chunk_step(n, carried):
            rows = pl.ds(n * chunk, chunk)
            if save_states:
                for index, leaf in enumerate(carried):
                    outs[2][n, index] = leaf
            o, new_state = kernel_math.chunk_step(
                *float32_tokens((q_ref, k_ref, v_ref), rows),
                gpu_chunk_scalars((lr_ref, eta_ref, decay_ref), rows),
                carried,
                kernel_common.last_row(config, n == num_chunks - 1),
                **kernel_common.static_options(config),
            )
            o_ref[rows, :] = o.astype(o_ref.dtype)
            return new_state

        initial = tuple(initial_ref[index] for index in range(4))
        final = jax.lax.fori_loop(0, num_chunks, chunk_step, initial)
        for index, leaf in enumerate(final):
            final_ref[index] = leaf

    out_shape = [
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct(state.shape, jnp.float32),
    ]
    out_specs = [gpu_per_program((length, dim)), gpu_per_program(state_shape)]
    if save_states:
        states_shape = (num_chunks, *state_shape)
        out_shape.append(jax.ShapeDtypeStruct((*grid, *states_shape), jnp.float32))
        out_specs.append(gpu_per_program(states_shape))
    outputs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[gpu_per_program((length, dim))] * 3
        + [gpu_per_program((length,))] * 3
        + [gpu_per_program(state_shape)],
        out_specs=out_specs,
        compiler_params=gpu_compiler_params(config),
        cost_estimate=kernel_common.pallas_cost(q, state, config, backward=False),
        interpret=config.interpret,
        name="neural_memory_forward_gpu",
    )(q, k, v, lr, eta, log_decay, state)
    return outputs[0], outputs[1], (outputs[2] if save_states else None)


def backward(config, q, k, v, lr, eta, log_decay, chunk_states, d_o, d_final_state):
    """Reverse chunk loop; returns (dq, dk, dv, dlr, deta, dg, d_state_0), all float32."""
    dim, state_shape, chunk = q.shape[-1], chunk_states.shape[3:], config.chunk_size
    grid, length, num_chunks = gpu_grid(q, chunk)

    def kernel(q_ref, k_ref, v_ref, lr_ref, eta_ref, decay_ref, states_ref, *refs):
        d_o_ref, d_final_ref, dq_ref, dk_ref, dv_ref = refs[:5]
        d_scalar_refs, d_initial_ref = refs[5:8], refs[8]

        def chunk_step(step, d_state):
            n = num_chunks - 1 - step
            rows = pl.ds(n * chunk, chunk)
            dq, dk, dv, d_scalars, d_state = kernel_math.chunk_step_backward(
                *float32_tokens((q_ref, k_ref, v_ref), rows),
                gpu_chunk_scalars((lr_ref, eta_ref, decay_ref), rows),
                tuple(states_ref[n, index] for index in range(4)),
                kernel_common.last_row(config, step == 0),
                d_o_ref[rows, :].astype(jnp.float32),
                d_state,
                **kernel_common.static_options(config),
            )
            dq_ref[rows, :], dk_ref[rows, :], dv_ref[rows, :] = dq, dk, dv
            for index, ref in enumerate(d_scalar_refs):
                col, row = d_scalars[2 * index], d_scalars[2 * index + 1]
                ref[rows] = col.reshape(chunk) + row.reshape(chunk)
            return d_state

        d_final = tuple(d_final_ref[index] for index in range(4))
        d_initial = jax.lax.fori_loop(0, num_chunks, chunk_step, d_final)
        for index, leaf in enumerate(d_initial):
            d_initial_ref[index] = leaf

    f32 = jnp.float32
    scalar_block = gpu_per_program((length,))
    outputs = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(x.shape, f32) for x in (q, k, v, lr, eta, log_decay)]
        + [jax.ShapeDtypeStruct(d_final_state.shape, f32)],
        grid=grid,
        in_specs=[gpu_per_program((length, dim))] * 3
        + [scalar_block] * 3
        + [
            gpu_per_program((num_chunks, *state_shape)),
            gpu_per_program((length, dim)),
            gpu_per_program(state_shape),
        ],
        out_specs=[gpu_per_program((length, dim))] * 3
        + [scalar_block] * 3
        + [gpu_per_program(state_shape)],
        compiler_params=gpu_compiler_params(config),
        cost_estimate=kernel_common.pallas_cost(q, d_final_state, config, backward=True),
        interpret=config.interpret,
        name="neural_memory_backward_gpu",
    )(q, k, v, lr, eta, log_decay, chunk_states, d_o, d_final_state)
    return tuple(outputs)


recurrence = kernel_common.make_recurrence(forward, backward)
