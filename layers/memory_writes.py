"""What a block's memory writes: the records of the probe contract (`models.registry`).

Every block kind answers `block.memory_writes(x, positions)` with one of these, so that
`evals.memory_behaviour` can replay the memory token by token without knowing the block:

    DeepMemoryWrites    a deep (neural) memory: its MemorySpec, chunk size, the per-token
                        inputs `NeuralMemory.features` gives and the initial state
    MatrixMemoryWrites  a matrix memory S [Dk, Dv] per head: the rule and q, k, v, g, beta
                        as `LinearMemory.features` gives them, and which (token, head) pairs
                        are written (Mixture-of-Memories folds its memories into heads)
    NoMemory            nothing trained in the forward pass (attention), with the reason

They are pytrees (arrays are leaves; rule, spec, sizes and reasons are static), so a jitted
function can return them.
"""

import dataclasses

import jax

from pallas_kernels.neural_memory import MemoryInputs, MemorySpec, NeuralMemoryState


def _pytree(*static):
    """A frozen dataclass registered as a pytree whose `static` fields are metadata."""

    def register(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        data = [field.name for field in dataclasses.fields(cls) if field.name not in static]
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(static))

    return register


@_pytree("spec", "chunk_size", "length")
class DeepMemoryWrites:
    """inputs: `MemoryInputs` [B, T, H, ...] (`NeuralMemory.features`);
    length: how many leading tokens are real (MAC pads to whole segments), None = all."""

    spec: MemorySpec
    chunk_size: int
    inputs: MemoryInputs
    initial_state: NeuralMemoryState
    length: int | None = None


@_pytree("rule", "normalize")
class MatrixMemoryWrites:
    """q, k [B, T, H, Dk], v [B, T, H, Dv], g / beta [B, T, H] or None; written [B, T, H]
    bool or None (every pair); normalize: reads are divided by z_t^T q (linear attention's
    normaliser, `LinearMemory(normalize=True)`)."""

    rule: str
    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array | None
    beta: jax.Array | None
    written: jax.Array | None = None
    normalize: bool = False


@_pytree("reason")
class NoMemory:
    """Nothing to replay (no memory trained in the forward pass, or one the trace cannot
    follow), and why."""

    reason: str
