"""Quintic Newton-Schulz orthogonalisation, shared by Muon and NorMuon.

Layout: the last two axes of an array are one matrix in Flax layout `[fan_in, fan_out]`; all
leading axes index independent matrices (layers, heads, experts), each orthogonalised on its
own. Orthogonalisation commutes with transposition (`NS(A^T) = NS(A)^T`), and the iteration
always runs on the wide orientation (rows <= cols, as in the reference), so the products
computed for a Flax kernel are exactly those the PyTorch reference computes for its
`[fan_out, fan_in]` weight.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

# Coefficients (a, b, c) of the quintic p(x) = a x + b x^3 + c x^5 from KellerJordan/Muon,
# chosen to maximise the slope at zero; singular values land in roughly [0.7, 1.2].
QUINTIC_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def orthogonalize(matrices: jnp.ndarray, *, steps: int = 5, dtype=jnp.bfloat16) -> jnp.ndarray:
    """Approximate `U V^T` of each matrix `U S V^T` in `matrices[..., :, :]`.

    Muon's `zeropower_via_newtonschulz5`: normalise by the Frobenius norm (so the spectral
    norm is <= 1), then `steps` times `A = X X^T; X = a X + (b A + c A A) X`, in `dtype`.
    Returns `dtype`; callers cast back.
    """
    if matrices.ndim < 2:
        raise ValueError(f"orthogonalize needs a (stack of) matrices, got shape {matrices.shape}")
    sharding = _explicit_matrix_sharding(matrices)
    if sharding is None:
        return _newton_schulz(matrices, steps, dtype)
    # Explicitly sharded (FSDP) matrices are gathered whole: each device runs the iteration
    # on full matrices; stack axes keep their sharding.
    stack_spec = tuple(sharding.spec)[:-2]
    whole = NamedSharding(sharding.mesh, PartitionSpec(*stack_spec, None, None))
    result = _newton_schulz(jax.sharding.reshard(matrices, whole), steps, dtype)
    return jax.sharding.reshard(result, sharding)


def _explicit_matrix_sharding(x) -> NamedSharding | None:
    """`x`'s sharding if a mesh axis shards its matrix axes explicitly, else None.

    Under `AxisType.Auto` meshes (and unsharded arrays) XLA's partitioner inserts the
    collectives itself; explicit sharding types would instead reject `X @ X^T` of a matrix
    split along rows, so those matrices are gathered first.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is None or not sharding.mesh.explicit_axes:
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    if spec[-2] is None and spec[-1] is None:
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def _newton_schulz(matrices, steps, dtype):
    a, b, c = QUINTIC_COEFFICIENTS
    transposed = matrices.shape[-2] > matrices.shape[-1]
    x = jnp.swapaxes(matrices, -1, -2) if transposed else matrices
    # The norm is taken in float32 (bf16 sums of squares lose digits on large matrices).
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=(-2, -1), keepdims=True))
    x = (x32 / (norm + 1e-7)).astype(dtype)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return jnp.swapaxes(x, -1, -2) if transposed else x


def ns_dtype(name: str):
    """`"bfloat16"` / `"float32"` as a dtype (ValueError names the allowed values)."""
    if name not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {tuple(NS_DTYPES)}, got {name!r}")
    return NS_DTYPES[name]


def update_scale(fan_in: int, fan_out: int, rule: str) -> float:
    """Muon's per-matrix update scale, translated to Flax `[fan_in, fan_out]` layout.

    "shape": `sqrt(max(1, fan_out / fan_in))` (KellerJordan/Muon writes
    `max(1, grad.size(-2) / grad.size(-1))` for a PyTorch `[fan_out, fan_in]` weight).
    "match_adamw": `0.2 * sqrt(max(fan_in, fan_out))`, which gives the update the RMS of a
    typical AdamW update (Moonlight, Liu et al. 2025, eq. 4).
    """
    if rule == "shape":
        return max(1.0, fan_out / fan_in) ** 0.5
    if rule == "match_adamw":
        return 0.2 * max(fan_in, fan_out) ** 0.5
    raise ValueError(f"scale must be 'shape' or 'match_adamw', got {rule!r}")
