"""Mosaic TPU Pallas kernels for the chunked Titans deep-memory update, forward and backward.

Grid (batch, head, chunk): batch and head "parallel", the chunk axis innermost and
"arbitrary" (sequential). The float32 state -- W1, W2^T, S1, S2^T, four `[D, E·D]`
matrices (`kernel_common.pack_state`) -- lives in one VMEM scratch buffer across the chunk
loop; each step runs `kernel_math.chunk_step` on one chunk (memory on the chunk's keys at
the decayed chunk-start weights, hand backprop through LN-residual / activation / both
layers, momentum and decay coefficients, state at the chunk end, retrieval on the queries).

What is on chip per grid step: the state scratch (16 D·E·D bytes) plus, double-buffered by
Pallas, the state blocks in and out (initial / final / saved chunk state, 3 x 2 x 16 D·E·D
bytes) and the chunk's tokens; with E = 2 that is ~3.5 MiB at D = 128 and ~0.9 MiB at
D = 64, inside the default scoped VMEM (16 MiB on v5e, 32 MiB on v6e) up to D = 128, E = 4
(~7 MiB). Larger D·E·D would need the state tiled over E·D (not done here).

The backward walks the chunks in reverse (index maps read chunk N-1-n) with the state
gradient in VMEM scratch, recomputing each chunk from its saved starting state and taking
the chunk's VJP (`kernel_math.chunk_step_backward`).

Per-token scalars (theta, eta, g) are passed twice, as `[.., b, 1]` columns and
`[.., 1, b]` rows: both block shapes equal the array's full minor dims, which Mosaic's
(8, 128) tiling rule accepts. The chunk size must be a multiple of 8 (16 for bfloat16).
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.neural_memory import kernel_common, kernel_math
from pallas_kernels.pallas_blocks import (
    float32_tokens,
    tpu_compiler_params,
    tpu_grid,
    tpu_scalar_gradient,
)


def _load_state(ref):
    return tuple(ref[index] for index in range(4))


def _store_state(ref, state):
    for index, leaf in enumerate(state):
        ref[index] = leaf


def forward(config, q, k, v, lr, eta, log_decay, state, save_states=False):
    """Kernel layout in (see kernel_common); returns (o, final state, chunk states | None)."""
    dim, state_shape = q.shape[-1], state.shape[2:]
    grid = tpu_grid(q, (lr, eta, log_decay), config.chunk_size, state_shape, reverse=False)

    def kernel(q_ref, k_ref, v_ref, *refs):
        scalar_refs, (initial_ref, o_ref, final_ref), rest = refs[:6], refs[6:9], refs[9:]
        state_scratch = rest[-1]
        chunk_index = pl.program_id(2)
        is_final_chunk = chunk_index == pl.num_programs(2) - 1

        @pl.when(chunk_index == 0)
        def _():
            state_scratch[...] = initial_ref[...]

        if save_states:
            rest[0][...] = state_scratch[...]
        o, new_state = kernel_math.chunk_step(
            *float32_tokens((q_ref, k_ref, v_ref)),
            tuple(ref[...] for ref in scalar_refs),
            _load_state(state_scratch),
            kernel_common.last_row(config, is_final_chunk),
            **kernel_common.static_options(config),
        )
        o_ref[...] = o.astype(o_ref.dtype)
        _store_state(state_scratch, new_state)

        @pl.when(is_final_chunk)
        def _():
            _store_state(final_ref, new_state)

    out_shape = [
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct(state.shape, jnp.float32),
    ]
    out_specs = [grid.token_block(dim), grid.whole_state]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((*grid.shape, *state_shape), jnp.float32))
        out_specs.append(grid.chunk_state)
    outputs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid.shape,
        in_specs=[grid.token_block(dim)] * 3 + grid.scalar_specs + [grid.whole_state],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM(state_shape, jnp.float32)],
        compiler_params=tpu_compiler_params(),
        cost_estimate=kernel_common.pallas_cost(q, state, config, backward=False),
        interpret=config.interpret,
        name="neural_memory_forward_tpu",
    )(q, k, v, *grid.scalar_inputs, state)
    return outputs[0], outputs[1], (outputs[2] if save_states else None)


def backward(config, q, k, v, lr, eta, log_decay, chunk_states, d_o, d_final_state):
    """Reverse chunk loop; returns (dq, dk, dv, dlr, deta, dg, d_state_0), all float32."""
    dim, state_shape = q.shape[-1], chunk_states.shape[3:]
    grid = tpu_grid(q, (lr, eta, log_decay), config.chunk_size, state_shape, reverse=True)

    def kernel(q_ref, k_ref, v_ref, *refs):
        scalar_refs = refs[:6]
        states_ref, d_o_ref, d_final_ref = refs[6:9]
        dq_ref, dk_ref, dv_ref = refs[9:12]
        d_scalar_refs = refs[12:18]
        d_initial_ref, d_state_scratch = refs[18:]
        step = pl.program_id(2)

        @pl.when(step == 0)
        def _():
            d_state_scratch[...] = d_final_ref[...]

        dq, dk, dv, d_scalars, d_state = kernel_math.chunk_step_backward(
            *float32_tokens((q_ref, k_ref, v_ref)),
            tuple(ref[...] for ref in scalar_refs),
            _load_state(states_ref),
            kernel_common.last_row(config, step == 0),
            d_o_ref[...].astype(jnp.float32),
            _load_state(d_state_scratch),
            **kernel_common.static_options(config),
        )
        dq_ref[...], dk_ref[...], dv_ref[...] = dq, dk, dv
        for ref, value in zip(d_scalar_refs, d_scalars):
            ref[...] = value
        _store_state(d_state_scratch, d_state)

        @pl.when(step == pl.num_programs(2) - 1)
        def _():
            _store_state(d_initial_ref, d_state)

    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct(x.shape, f32) for x in (q, k, v)]
    out_shape += [*grid.scalar_gradient_shapes()] * 3
    out_shape += [jax.ShapeDtypeStruct(d_final_state.shape, f32)]
    outputs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid.shape,
        in_specs=[grid.token_block(dim)] * 3
        + grid.scalar_specs
        + [grid.chunk_state, grid.token_block(dim), grid.whole_state],
        out_specs=[grid.token_block(dim)] * 3 + grid.scalar_specs + [grid.whole_state],
        scratch_shapes=[pltpu.VMEM(state_shape, f32)],
        compiler_params=tpu_compiler_params(),
        cost_estimate=kernel_common.pallas_cost(q, d_final_state, config, backward=True),
        interpret=config.interpret,
        name="neural_memory_backward_tpu",
    )(q, k, v, *grid.scalar_inputs, chunk_states, d_o, d_final_state)
    d_scalars = map(tpu_scalar_gradient, outputs[3:9:2], outputs[4:9:2])
    return (*outputs[:3], *d_scalars, outputs[9])


recurrence = kernel_common.make_recurrence(forward, backward)
