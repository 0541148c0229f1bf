"""Public matrix-memory recurrences: linear attention, simple GLA, DeltaNet, Gated DeltaNet.

Conventions are flash-linear-attention's, so outputs compare with it directly:

    q, k: [B, T, H, Dk]   v, o: [B, T, H, Dv]   g, beta: [B, T, H]   state: [B, H, Dk, Dv]
    S_t = exp(g_t) S_{t-1} + β_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T     (gated delta rule)
    o_t = scale · S_t^T q_t,  scale = Dk ** -0.5 by default

The delta rule is the case g = 0, simple GLA replaces the delta update with `+ k_t v_t^T`,
linear attention is simple GLA with g = 0. q and k are not normalised here; β ∈ (0, 1) and
g ≤ 0 are what the layers feed (not checked, since they are traced values).

Every function returns `(o, final_state)`: o in v's dtype, final_state float32 (None unless
`output_final_state`). Internally the state and all accumulation are float32.

`segment_ids` ([B, T] int, packed sequences): the state resets to zero wherever the id
changes between t-1 and t. `initial_state` applies only at t = 0, because a new segment is a
new document and must not see the memory that belonged to another one.

`impl`:
  "reference"   token-by-token scan, the slow oracle;
  "chunked"     chunk-parallel XLA, every backend;
  "pallas_tpu"  the Mosaic TPU kernel (`tpu.py`), "pallas_gpu" the Triton kernel (`gpu.py`),
                forced whatever the backend, so either can be exported from any machine;
  "pallas"      the kernel of `jax.default_backend()` (TPU -> tpu.py, GPU -> gpu.py; on CPU
                only with interpret=True, which then runs the TPU kernel);
  "auto"        a kernel only where its tests cover the call (`kernel_for_auto`), else
                "chunked": TPU backend with Dk, Dv in {128, 256} and a chunk size that is a
                multiple of 16; GPU backend with Dk, Dv powers of 2 in [16, 128] and a
                chunk size of 16, 32 or 64; q, k, v float32 or bfloat16 in both.
`interpret=True` runs the chosen Pallas kernel on CPU (Pallas interpret mode).
The kernels' tests run them in interpret mode and export them for TPU / CUDA; a run on
real hardware is not part of the test suite (see tests/pallas_kernels/).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import (
    auto_platform,
    check_impl,
    dtype_rejects,
    is_power_of_2,
    kernel_platform,
)
from pallas_kernels.linear_memory import chunked, gpu, reference, tpu
from pallas_kernels.linear_memory.block_sizes import default_block_sizes

# Rule -> the gates it takes (g: log decay, beta: delta-rule write strength).
RULE_GATES = {
    "linear_attention": (),
    "gla": ("g",),
    "deltanet": ("beta",),
    "gated_deltanet": ("g", "beta"),
}
RULES = tuple(RULE_GATES)
DECAY_RULES = tuple(rule for rule, gates in RULE_GATES.items() if "g" in gates)
DELTA_RULES = tuple(rule for rule, gates in RULE_GATES.items() if "beta" in gates)

# Jitted so eager calls (notebooks, tests) compile once instead of dispatching op by op;
# inside an outer jit these are simply inlined.
_reference = jax.jit(reference.recurrence)
_chunked = jax.jit(chunked.recurrence, static_argnames=("chunk_size",))
_KERNEL_STATIC = ("scale", "block_sizes", "interpret")
_kernels = {
    "tpu": jax.jit(tpu.recurrence, static_argnames=_KERNEL_STATIC),
    "gpu": jax.jit(gpu.recurrence, static_argnames=_KERNEL_STATIC),
}


def kernel_rejects(platform, key_dim, value_dim, chunk_size, dtypes):
    """Why a kernel cannot take these shapes / dtypes (None if it can).

    TPU: chunk a multiple of 16 (bf16 sublane tiling); any Dk, Dv (blocks span them whole).
    GPU: Triton blocks must have power-of-2 sizes and its dots need every side >= 16.
    """
    reason = dtype_rejects(dtypes)
    if reason is not None:
        return reason
    if platform == "tpu":
        return None if chunk_size % 16 == 0 else f"chunk_size={chunk_size} (a multiple of 16)"
    for name, size in (("chunk_size", chunk_size), ("Dk", key_dim), ("Dv", value_dim)):
        if not (is_power_of_2(size) and size >= 16):
            return f"{name}={size} (a power of 2, at least 16)"
    return None


def _auto_covers(platform, key_dim, value_dim, chunk_size):
    """Shapes impl="auto" sends to a kernel: those its tests and lowering checks cover and
    that use the hardware well. TPU: Dk, Dv in {128, 256} (whole (8, 128) tiles, state fits
    VMEM). GPU: Dk, Dv <= 128 and chunk <= 64 (the state stays in registers)."""
    if platform == "tpu":
        return key_dim in (128, 256) and value_dim in (128, 256)
    return key_dim <= 128 and value_dim <= 128 and chunk_size <= 64


def _kernel_checks(q, k, v, chunk_size):
    """(rejects, covers) of `pallas_kernels.dispatch` for this call."""
    key_dim, value_dim, dtypes = q.shape[-1], v.shape[-1], (q.dtype, k.dtype, v.dtype)
    return (
        lambda platform: kernel_rejects(platform, key_dim, value_dim, chunk_size, dtypes),
        lambda platform: _auto_covers(platform, key_dim, value_dim, chunk_size),
    )


def kernel_for_auto(q, k, v, chunk_size):
    """Platform of the kernel impl="auto" uses for these inputs, or None (use chunked)."""
    return auto_platform(*_kernel_checks(q, k, v, chunk_size))


def _shape_error(name, shape, expected):
    return ValueError(f"{name} has shape {tuple(shape)}, expected {expected}")


def _require(**arrays):
    """A gate the rule needs must be an array: None would silently run a different rule."""
    for name, x in arrays.items():
        if x is None:
            raise ValueError(f"{name} is None, expected an array of shape [B, T, H]")


def _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size, impl):
    check_impl(impl)
    if q.ndim != 4:
        raise _shape_error("q", q.shape, "[B, T, H, Dk]")
    batch_size, length, num_heads, key_dim = q.shape
    if k.shape != q.shape:
        raise _shape_error("k", k.shape, f"q's shape {tuple(q.shape)} ([B, T, H, Dk])")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise _shape_error("v", v.shape, f"({batch_size}, {length}, {num_heads}, Dv)")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} has dtype {x.dtype}, expected a floating dtype")
    per_token = (batch_size, length, num_heads)
    for name, x in (("g", g), ("beta", beta)):
        if x is not None and tuple(x.shape) != per_token:
            raise _shape_error(name, x.shape, f"{per_token} ([B, T, H])")
    state_shape = (batch_size, num_heads, key_dim, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise _shape_error("initial_state", initial_state.shape, f"{state_shape} ([B, H, Dk, Dv])")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (batch_size, length):
            raise _shape_error("segment_ids", segment_ids.shape, f"{(batch_size, length)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids has dtype {segment_ids.dtype}, expected integers")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}, expected a positive int")


def recurrence(
    rule,
    q,
    k,
    v,
    g=None,
    beta=None,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    segment_ids=None,
    chunk_size=64,
    impl="auto",
    interpret=False,
):
    """The matrix-memory recurrence named `rule` (one of RULES, the layers' and configs'
    names; see the module docstring) -> (o, final_state or None). A gate the rule takes must
    be given; one it does not take is ignored."""
    if rule not in RULE_GATES:
        raise ValueError(f"rule={rule!r} is not one of {RULES}")
    gates = RULE_GATES[rule]
    _require(**{name: x for name, x in (("g", g), ("beta", beta)) if name in gates})
    g = g if "g" in gates else None
    beta = beta if "beta" in gates else None
    _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size, impl)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    common = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    platform, interpret = kernel_platform(impl, interpret, *_kernel_checks(q, k, v, chunk_size))
    if impl == "reference":
        o, final_state = _reference(q, k, v, g, beta, **common)
    elif platform is not None:
        block_sizes = default_block_sizes(platform, chunk_size)
        o, final_state = _kernels[platform](
            q, k, v, g, beta, block_sizes=block_sizes, interpret=interpret, **common
        )
    else:  # "chunked", and "auto" where no kernel covers the call.
        o, final_state = _chunked(q, k, v, g, beta, chunk_size=chunk_size, **common)
    return o, (final_state if output_final_state else None)


# Katharopoulos et al.'s reference code (fast-transformers) adds 1e-6 to the normaliser.
NORMALIZER_EPS = 1e-6


def normalized_recurrence(
    rule, q, k, v, g=None, *, eps=NORMALIZER_EPS, initial_state=None, **options
):
    """An additive rule with linear attention's normaliser (Katharopoulos et al. 2020,
    "Transformers are RNNs", §3.2 and the causal form of §3.3):

        S_t = exp(g_t) S_{t-1} + k_t v_t^T,   z_t = exp(g_t) z_{t-1} + k_t,
        o_t = S_t^T q_t / (z_t^T q_t + eps)

    with q, k already through a positive feature map (the layer's φ); there is no scale
    (any scale would cancel but for eps). z travels as one more value column: the
    recurrence runs on [v, 1], so every implementation, and the reset of packed segments,
    serves it unchanged. The state
    (`initial_state`, the final state) is [B, H, Dk, Dv + 1] with z as its last column.
    `options` are `recurrence`'s."""
    if rule in DELTA_RULES:
        raise ValueError(f"rule={rule!r}: the normaliser is for additive rules, not {DELTA_RULES}")
    ones = jnp.ones((*v.shape[:-1], 1), v.dtype)
    options = {**options, "scale": 1.0, "initial_state": initial_state}
    extended, final_state = recurrence(
        rule, q, k, jnp.concatenate([v, ones], axis=-1), g, **options
    )
    extended = extended.astype(jnp.float32)
    o = extended[..., :-1] / (extended[..., -1:] + eps)
    return o.astype(v.dtype), final_state


# The four recurrences under fla's names; `options` are `recurrence`'s keyword arguments.


def linear_attention(q, k, v, **options):
    """Linear attention: `S_t = S_{t-1} + k_t v_t^T`, `o_t = scale · S_t^T q_t`."""
    return recurrence("linear_attention", q, k, v, **options)


def simple_gla(q, k, v, g, **options):
    """Simple GLA (scalar decay per head and step): `S_t = exp(g_t) S_{t-1} + k_t v_t^T`."""
    return recurrence("gla", q, k, v, g, **options)


def delta_rule(q, k, v, beta, **options):
    """DeltaNet (Yang et al. 2024, eq. 1): `S_t = S_{t-1} + β_t k_t (v_t - S_{t-1}^T k_t)^T`."""
    return recurrence("deltanet", q, k, v, beta=beta, **options)


def gated_delta_rule(q, k, v, g, beta, **options):
    """Gated DeltaNet (Yang et al. 2025, eq. 10):
    `S_t = exp(g_t) S_{t-1} + β_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T`."""
    return recurrence("gated_deltanet", q, k, v, g, beta, **options)
