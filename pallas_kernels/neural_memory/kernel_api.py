"""Entry points of the deep-memory Pallas kernels, for `api.neural_memory`'s impl dispatch.

The kernels (`tpu.py` Mosaic TPU, `gpu.py` Triton) cover one point of the Miras space, the
Titans LMM memory that MAC / MAG / MAL use: architecture "mlp" of depth 2 (GELU or SiLU),
bias "l2", retention "gated_decay", rule "momentum", omega_window 1. Every other spec runs
the chunked XLA path; `kernel_rejects` says why.

    kernel_platform_for_auto(spec, q, k, v, chunk_size) -> "tpu" | "gpu" | None
    kernel_checks(spec, q, k, v, chunk_size) -> (rejects, covers) for `pallas_kernels.dispatch`
    kernel_rejects(spec, platform, key_dim, value_dim, chunk_size, dtypes) -> reason | None
    run_kernel(spec, inputs, initial_state, *, chunk_size, platform, interpret)
        -> (o [B, T, H, D] in v's dtype, final float32 state)

`run_kernel` equals `chunked.chunked_scan` (same chunking, same padding of a partial final
chunk), with gradients of q, k, v, lr, momentum, log_decay and the initial state.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import auto_platform, dtype_rejects, is_power_of_2
from pallas_kernels.neural_memory import gpu, kernel_math, tpu
from pallas_kernels.neural_memory.block_sizes import default_block_sizes
from pallas_kernels.neural_memory.memory_inputs import MemoryInputs

# The spec fields the kernels hard-wire, with the only value they implement.
_KERNEL_SPEC = {
    "architecture": "mlp",
    "depth": 2,
    "bias": "l2",
    "retention": "gated_decay",
    "rule": "momentum",
    "omega_window": 1,
}
_STATIC = ("block_sizes", "interpret")
_recurrences = {
    "tpu": jax.jit(tpu.recurrence, static_argnums=(0,), static_argnames=_STATIC),
    "gpu": jax.jit(gpu.recurrence, static_argnums=(0,), static_argnames=_STATIC),
}


def kernel_rejects(spec, platform, key_dim, value_dim, chunk_size, dtypes):
    """Why the `platform` ("tpu" / "gpu") kernel cannot run this call (None if it can).

    TPU: chunk a multiple of 8 (16 with bfloat16 inputs: a bf16 sublane tile); any D (blocks
    span it whole). GPU: Triton blocks need power-of-2 sides and its dots sides >= 16, so
    chunk, D and E·D powers of 2, at least 16.
    """
    for field, wanted in _KERNEL_SPEC.items():
        value = getattr(spec, field, wanted)
        if value != wanted:
            return f"MemorySpec.{field}={value!r} (kernels implement {field}={wanted!r})"
    if spec.activation not in kernel_math.ACTIVATIONS:
        return f"MemorySpec.activation={spec.activation!r}"
    if key_dim != value_dim:
        return f"Dk={key_dim} != Dv={value_dim} (an mlp memory maps D -> D)"
    dtypes = [jnp.dtype(dtype) for dtype in dtypes]
    reason = dtype_rejects(dtypes)
    if reason is not None:
        return reason
    if platform == "tpu":
        tile = 16 if jnp.dtype(jnp.bfloat16) in dtypes else 8
        return None if chunk_size % tile == 0 else f"chunk_size={chunk_size} (a multiple of {tile})"
    hidden = spec.expansion * key_dim
    for name, size in (("chunk_size", chunk_size), ("D", key_dim), ("E·D", hidden)):
        if not (is_power_of_2(size) and size >= 16):
            return f"{name}={size} (a power of 2, at least 16)"
    return None


def _auto_covers(spec, platform, dim, chunk_size):
    """Shapes impl="auto" sends to a kernel: covered by the tests and lowering checks, and
    where the state stays on chip. TPU: D in {64, 128} (lane-dense), E·D <= 512 (state
    buffers within the default scoped VMEM), chunk a multiple of 16 up to 128. GPU: D <= 32,
    E·D <= 128, chunk 16..64 (the carried state fits in registers)."""
    hidden = spec.expansion * dim
    if platform == "tpu":
        return dim in (64, 128) and hidden <= 512 and chunk_size % 16 == 0 and chunk_size <= 128
    return dim <= 32 and hidden <= 128 and chunk_size <= 64


def kernel_checks(spec, q, k, v, chunk_size):
    """(rejects, covers) of `pallas_kernels.dispatch` for this call."""
    key_dim, value_dim, dtypes = q.shape[-1], v.shape[-1], (q.dtype, k.dtype, v.dtype)
    return (
        lambda platform: kernel_rejects(spec, platform, key_dim, value_dim, chunk_size, dtypes),
        lambda platform: _auto_covers(spec, platform, key_dim, chunk_size),
    )


def kernel_platform_for_auto(spec, q, k, v, chunk_size):
    """Platform of the kernel impl="auto" uses for these inputs, or None (run chunked)."""
    return auto_platform(*kernel_checks(spec, q, k, v, chunk_size))


def run_kernel(spec, inputs: MemoryInputs, initial_state, *, chunk_size, platform, interpret):
    """Run the `platform` kernel ("tpu" / "gpu"); `interpret=True` runs it on CPU.

    Arguments as `chunked.chunked_scan` (log_decay may be None: no forgetting; the kernels'
    spec declares no extra inputs); the caller checks shapes and `kernel_rejects` first.
    Returns (o in v's dtype, final float32 NeuralMemoryState).
    """
    if inputs.extra:
        raise ValueError(f"the kernels take no {sorted(inputs.extra)} input")
    block_sizes = default_block_sizes(platform, chunk_size)
    return _recurrences[platform](
        spec,
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.lr,
        inputs.momentum,
        inputs.log_decay,
        initial_state,
        block_sizes=block_sizes,
        interpret=bool(interpret),
    )
