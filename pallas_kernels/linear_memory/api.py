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

`impl`: "reference" (token-by-token scan, slow oracle), "chunked" (chunk-parallel XLA),
"auto" (today always "chunked"), "pallas" / "pallas_tpu" / "pallas_gpu" (Pallas kernels,
not yet available). `interpret=True` will run a Pallas kernel on CPU; it is accepted now so
call sites need not change when the kernels land.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.linear_memory import chunked, reference

IMPLS = ("auto", "reference", "chunked", "pallas", "pallas_tpu", "pallas_gpu")
_PALLAS_IMPLS = ("pallas", "pallas_tpu", "pallas_gpu")

# Jitted so eager calls (notebooks, tests) compile once instead of dispatching op by op;
# inside an outer jit these are simply inlined.
_reference = jax.jit(reference.recurrence)
_chunked = jax.jit(chunked.recurrence, static_argnames=("chunk_size",))


def _shape_error(name, shape, expected):
    return ValueError(f"{name} has shape {tuple(shape)}, expected {expected}")


def _require(**arrays):
    """A gate the rule needs must be an array: None would silently run a different rule."""
    for name, x in arrays.items():
        if x is None:
            raise ValueError(f"{name} is None, expected an array of shape [B, T, H]")


def _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
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


def _run(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale,
    initial_state,
    output_final_state,
    segment_ids,
    chunk_size,
    impl,
    interpret,
):
    del interpret  # Only meaningful for the Pallas kernels, which are not available yet.
    _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size, impl)
    if impl in _PALLAS_IMPLS:
        raise NotImplementedError(
            f"impl={impl!r}: linear-memory Pallas kernel not yet available; "
            "use impl='chunked' or 'auto'"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    common = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    if impl == "reference":
        o, final_state = _reference(q, k, v, g, beta, **common)
    else:  # "chunked", and "auto" until kernels exist.
        o, final_state = _chunked(q, k, v, g, beta, chunk_size=chunk_size, **common)
    return o, (final_state if output_final_state else None)


def linear_attention(
    q,
    k,
    v,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    segment_ids=None,
    chunk_size=64,
    impl="auto",
    interpret=False,
):
    """Linear attention: `S_t = S_{t-1} + k_t v_t^T`, `o_t = scale · S_t^T q_t`."""
    return _run(
        q,
        k,
        v,
        None,
        None,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        impl=impl,
        interpret=interpret,
    )


def simple_gla(
    q,
    k,
    v,
    g,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    segment_ids=None,
    chunk_size=64,
    impl="auto",
    interpret=False,
):
    """Simple GLA (scalar decay per head and step): `S_t = exp(g_t) S_{t-1} + k_t v_t^T`."""
    _require(g=g)
    return _run(
        q,
        k,
        v,
        g,
        None,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        impl=impl,
        interpret=interpret,
    )


def delta_rule(
    q,
    k,
    v,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    segment_ids=None,
    chunk_size=64,
    impl="auto",
    interpret=False,
):
    """DeltaNet (Yang et al. 2024, eq. 1): `S_t = S_{t-1} + β_t k_t (v_t - S_{t-1}^T k_t)^T`."""
    _require(beta=beta)
    return _run(
        q,
        k,
        v,
        None,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        impl=impl,
        interpret=interpret,
    )


def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    segment_ids=None,
    chunk_size=64,
    impl="auto",
    interpret=False,
):
    """Gated DeltaNet (Yang et al. 2025, eq. 10):
    `S_t = exp(g_t) S_{t-1} + β_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T`."""
    _require(g=g, beta=beta)
    return _run(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        impl=impl,
        interpret=interpret,
    )
