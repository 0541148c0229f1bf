"""Mosaic TPU Pallas kernels for the chunked matrix-memory recurrences, forward and backward.

Grid (batch, head, chunk): batch and head "parallel", the chunk axis innermost and
"arbitrary" (sequential), so the `[Dk, Dv]` float32 state lives in a VMEM scratch buffer
across the chunk loop. Each step runs `kernel_math.chunk_forward` (the UT transform by
forward substitution, W/U, output, state update) on one chunk.

The backward walks the chunks in reverse (the index maps read chunk N-1-n) with the state
gradient dS in VMEM scratch, recomputing each chunk from the state that entered it (saved
by the forward as `chunk_states`).

Per-token scalars (g, r, β; see `kernel_common`) are passed twice, as `[.., C, 1]` columns
and `[.., 1, C]` rows: both block shapes equal the array's full minor dims, which Mosaic's
(8, 128) tiling rule accepts, and the kernel never transposes a vector.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.linear_memory import kernel_common, kernel_math
from pallas_kernels.pallas_blocks import (
    float32_tokens,
    tpu_compiler_params,
    tpu_grid,
    tpu_scalar_gradient,
)


def _load_scalars(refs):
    """(g_col, g_row, r_col, r_row, β_col, β_row) from their six refs."""
    return tuple(ref[...] for ref in refs)


def _interpret(config):
    # Pallas's generic interpreter, not pltpu.InterpretParams(): in jax 0.10.2 the TPU
    # interpreter rejects vmapped kernels (it does not extend dimension_semantics over the
    # grid axis vmap adds; the Mosaic lowering does). Both agree on these kernels otherwise.
    return bool(config.interpret)


def forward(config, q, k, v, log_decay, resets, beta, initial_state, save_states=False):
    """Kernel layout in (see kernel_common); returns (o, final state, chunk states | None)."""
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    scalars = (log_decay, resets, beta)
    grid = tpu_grid(q, scalars, config.chunk_size, (key_dim, value_dim), reverse=False)

    def kernel(q_ref, k_ref, v_ref, *refs):
        scalar_refs, (initial_ref, o_ref, final_ref), rest = refs[:6], refs[6:9], refs[9:]
        states_ref = rest[0] if save_states else None
        state_scratch = rest[-1]
        chunk_index = pl.program_id(2)

        @pl.when(chunk_index == 0)
        def _():
            state_scratch[...] = initial_ref[...]

        state = state_scratch[...]
        if save_states:
            states_ref[...] = state
        o, next_state = kernel_math.chunk_forward(
            *float32_tokens((q_ref, k_ref, v_ref)),
            state,
            _load_scalars(scalar_refs),
            **kernel_common.static_options(config),
        )
        o_ref[...] = o.astype(o_ref.dtype)
        state_scratch[...] = next_state

        @pl.when(chunk_index == pl.num_programs(2) - 1)
        def _():
            final_ref[...] = next_state

    out_shape = [
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct(initial_state.shape, jnp.float32),
    ]
    out_specs = [grid.token_block(value_dim), grid.whole_state]
    if save_states:
        states_shape = (*grid.shape, key_dim, value_dim)
        out_shape.append(jax.ShapeDtypeStruct(states_shape, jnp.float32))
        out_specs.append(grid.chunk_state)
    flops, transcendentals, io_bytes = kernel_common.cost_estimate(config, q, v, backward=False)
    token_specs = grid.token_specs(key_dim, key_dim, value_dim)
    outputs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid.shape,
        in_specs=token_specs + grid.scalar_specs + [grid.whole_state],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((key_dim, value_dim), jnp.float32)],
        compiler_params=tpu_compiler_params(),
        cost_estimate=pl.CostEstimate(
            flops=flops, transcendentals=transcendentals, bytes_accessed=io_bytes
        ),
        interpret=_interpret(config),
        name="linear_memory_forward_tpu",
    )(q, k, v, *grid.scalar_inputs, initial_state)
    return outputs[0], outputs[1], (outputs[2] if save_states else None)


def backward(config, q, k, v, log_decay, resets, beta, chunk_states, d_o, d_final_state):
    """Reverse chunk loop; returns (dq, dk, dv, dg, dβ, dS_0), all float32."""
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    scalars = (log_decay, resets, beta)
    grid = tpu_grid(q, scalars, config.chunk_size, (key_dim, value_dim), reverse=True)

    def kernel(q_ref, k_ref, v_ref, *refs):
        scalar_refs = refs[:6]
        states_ref, d_o_ref, d_final_ref = refs[6:9]
        dq_ref, dk_ref, dv_ref, d_decay_col_ref, d_decay_row_ref, d_beta_ref = refs[9:15]
        d_initial_ref, d_state_scratch = refs[15:]
        step = pl.program_id(2)

        @pl.when(step == 0)
        def _():
            d_state_scratch[...] = d_final_ref[...]

        dq, dk, dv, d_decay_col, d_decay_row, d_beta, d_state = kernel_math.chunk_backward(
            *float32_tokens((q_ref, k_ref, v_ref)),
            states_ref[...],
            d_o_ref[...].astype(jnp.float32),
            d_state_scratch[...],
            _load_scalars(scalar_refs),
            **kernel_common.static_options(config),
        )
        dq_ref[...], dk_ref[...], dv_ref[...] = dq, dk, dv
        d_decay_col_ref[...], d_decay_row_ref[...], d_beta_ref[...] = (
            d_decay_col,
            d_decay_row,
            d_beta,
        )
        d_state_scratch[...] = d_state

        @pl.when(step == pl.num_programs(2) - 1)
        def _():
            d_initial_ref[...] = d_state

    f32 = jnp.float32
    scalar_col, scalar_row = grid.scalar_gradient_shapes()
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, f32),
        jax.ShapeDtypeStruct(k.shape, f32),
        jax.ShapeDtypeStruct(v.shape, f32),
        scalar_col,
        scalar_row,
        scalar_col,
        jax.ShapeDtypeStruct(d_final_state.shape, f32),
    ]
    token_specs = grid.token_specs(key_dim, key_dim, value_dim)
    # dβ is a column only: `kernel_math.chunk_backward` sums its parts per token.
    out_specs = token_specs + [grid.token_block(1), grid.row_block, grid.token_block(1)]
    out_specs.append(grid.whole_state)
    flops, transcendentals, io_bytes = kernel_common.cost_estimate(config, q, v, backward=True)
    dq, dk, dv, d_decay_col, d_decay_row, d_beta, d_initial = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid.shape,
        in_specs=token_specs
        + grid.scalar_specs
        + [grid.chunk_state, grid.token_block(value_dim), grid.whole_state],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((key_dim, value_dim), f32)],
        compiler_params=tpu_compiler_params(),
        cost_estimate=pl.CostEstimate(
            flops=flops, transcendentals=transcendentals, bytes_accessed=io_bytes
        ),
        interpret=_interpret(config),
        name="linear_memory_backward_tpu",
    )(q, k, v, *grid.scalar_inputs, chunk_states, d_o, d_final_state)
    d_decay = tpu_scalar_gradient(d_decay_col, d_decay_row)
    return dq, dk, dv, d_decay, d_beta[..., 0], d_initial


recurrence = kernel_common.make_recurrence(forward, backward)
