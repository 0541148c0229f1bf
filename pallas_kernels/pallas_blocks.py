"""Pallas scaffolding shared by the kernels of both recurrence families (`linear_memory/`,
`neural_memory/`): launch options, the grid and BlockSpecs of a call (`tpu_grid`,
`gpu_grid`), compiler parameters, per-token scalar layouts.

Both families run one program per (batch, head) over the chunks in order: on TPU a grid
(B, H, N chunks) whose last axis is sequential, on GPU (Triton) a grid (B, H) with a
`fori_loop` over the chunks inside. Per-token scalars (decays, gates, learning rates) are
`[B, H, T']` vectors; each kernel wants them as a column `[C, 1]` and a row `[1, C]`.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

# IEEE float32 dots everywhere: Pallas' Triton lowering (jax 0.10) turns precision None /
# DEFAULT / HIGH into TF32 on float32 operands; HIGHEST keeps full float32 (bfloat16
# operands are unaffected). The kernels are held to the float32 chunked forms.
PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchOptions:
    """How a kernel is launched (each family's `KernelConfig` adds what its math needs):
    Triton's warps and pipeline stages (None: Triton's defaults) and Pallas's interpreter."""

    num_warps: int | None = None
    num_stages: int | None = None
    interpret: bool = False


def float32_tokens(refs, rows=None):
    """Each token ref's block as float32: the whole block (TPU: one chunk), or its `rows`
    (GPU, where a block is the whole sequence)."""
    return tuple((ref[...] if rows is None else ref[rows, :]).astype(jnp.float32) for ref in refs)


# ---- TPU (Mosaic): grid (B, H, N), the chunk axis sequential -----------------------------


def tpu_compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def tpu_scalar_layouts(x, chunk_size):
    """[B, H, T'] -> column form [B, H, T', 1] and row form [B, H, N, 1, C]."""
    batch_size, num_heads, length = x.shape
    rows = x.reshape(batch_size, num_heads, length // chunk_size, 1, chunk_size)
    return x[..., None], rows


class TpuGrid(NamedTuple):
    """One TPU kernel call: its grid `shape` (B, H, N chunks), the BlockSpec makers of
    `tpu_specs` and its per-token scalars in both layouts (x_col, x_row, y_col, ...)."""

    shape: tuple[int, int, int]
    chunk_size: int
    token_block: Callable[[int], pl.BlockSpec]
    row_block: pl.BlockSpec
    chunk_state: pl.BlockSpec
    whole_state: pl.BlockSpec
    scalar_inputs: list

    def token_specs(self, *widths) -> list:
        """BlockSpecs of token arrays [B, H, T', width], one per width."""
        return [self.token_block(width) for width in widths]

    @property
    def scalar_specs(self) -> list:
        """The BlockSpecs of `scalar_inputs` (and of their gradients' two parts)."""
        return [self.token_block(1), self.row_block] * (len(self.scalar_inputs) // 2)

    def scalar_gradient_shapes(self):
        """float32 shapes of one scalar's gradient in column and row form."""
        batch_size, num_heads, num_chunks = self.shape
        chunk = self.chunk_size
        column = jax.ShapeDtypeStruct((batch_size, num_heads, num_chunks * chunk, 1), jnp.float32)
        row = jax.ShapeDtypeStruct((batch_size, num_heads, num_chunks, 1, chunk), jnp.float32)
        return column, row


def tpu_grid(q, scalars, chunk_size, state_shape, *, reverse) -> TpuGrid:
    """The grid over the chunks of q [B, H, T', D], walked backwards when `reverse`."""
    batch_size, num_heads, length = q.shape[:3]
    scalar_inputs = []
    for x in scalars:
        scalar_inputs += tpu_scalar_layouts(x, chunk_size)
    shape = (batch_size, num_heads, length // chunk_size)
    specs = tpu_specs(chunk_size, state_shape, reverse)
    return TpuGrid(shape, chunk_size, *specs, scalar_inputs)


def tpu_scalar_gradient(column, row):
    """A scalar's gradient [B, H, T'] from its column [B, H, T', 1] and row [B, H, N, 1, C]
    parts (the kernels use the scalar in both layouts)."""
    return column[..., 0] + row.reshape(column.shape[:-1])


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


def gpu_grid(q, chunk_size):
    """(grid (B, H), T', number of chunks) of a call over q [B, H, T', D]."""
    batch_size, num_heads, length = q.shape[:3]
    return (batch_size, num_heads), length, length // chunk_size


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
