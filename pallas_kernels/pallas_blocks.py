"""Pallas scaffolding shared by the kernels of both recurrence families (`linear_memory/`,
`neural_memory/`): BlockSpecs, compiler parameters, per-token scalar layouts.

Both families run one program per (batch, head) over the chunks in order: on TPU a grid
(B, H, N chunks) whose last axis is sequential, on GPU (Triton) a grid (B, H) with a
`fori_loop` over the chunks inside. Per-token scalars (decays, gates, learning rates) are
`[B, H, T']` vectors; each kernel wants them as a column `[C, 1]` and a row `[1, C]`.
"""

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

# IEEE float32 dots everywhere: Pallas' Triton lowering (jax 0.10) turns precision None /
# DEFAULT / HIGH into TF32 on float32 operands; HIGHEST keeps full float32 (bfloat16
# operands are unaffected). The kernels are held to the float32 chunked forms.
PRECISION = jax.lax.Precision.HIGHEST


# ---- TPU (Mosaic): grid (B, H, N), the chunk axis sequential -----------------------------


def tpu_compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def tpu_scalar_layouts(x, chunk_size):
    """[B, H, T'] -> column form [B, H, T', 1] and row form [B, H, N, 1, C]."""
    batch_size, num_heads, length = x.shape
    rows = x.reshape(batch_size, num_heads, length // chunk_size, 1, chunk_size)
    return x[..., None], rows


def tpu_specs(chunk, state_shape, reverse):
    """BlockSpec makers over grid (b, h, n), chunks walked backwards when `reverse`:
    token_block(width) [C, width] of one chunk, row_block [1, C] of a scalar row, chunk_state
    (the state entering one chunk, `state_shape`) and whole_state (one per (b, h))."""
    zeros = (0,) * len(state_shape)

    def chunk_index(n):
        return (pl.num_programs(2) - 1 - n) if reverse else n

    def token_block(width):
        return pl.BlockSpec((None, None, chunk, width), lambda b, h, n: (b, h, chunk_index(n), 0))

    row_block = pl.BlockSpec(
        (None, None, None, 1, chunk), lambda b, h, n: (b, h, chunk_index(n), 0, 0)
    )
    chunk_state = pl.BlockSpec(
        (None, None, None, *state_shape), lambda b, h, n: (b, h, chunk_index(n), *zeros)
    )
    whole_state = pl.BlockSpec((None, None, *state_shape), lambda b, h, n: (b, h, *zeros))
    return token_block, row_block, chunk_state, whole_state


# ---- GPU (Triton): grid (B, H), a fori_loop over the chunks -------------------------------


def gpu_compiler_params(config):
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def gpu_per_program(shape):
    """Block of one (batch, head): the whole sequence (or state / chunk-state stack)."""
    return pl.BlockSpec((None, None, *shape), lambda b, h: (b, h) + (0,) * len(shape))


def gpu_chunk_scalars(refs, rows):
    """(x_col, x_row) of every scalar ref in turn, for the chunk at `rows`."""
    out = []
    for ref in refs:
        x = ref[rows]
        out += [x[:, None], x[None, :]]
    return tuple(out)
