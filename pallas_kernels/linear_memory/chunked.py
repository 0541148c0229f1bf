"""Chunk-parallel matrix-memory recurrences in plain JAX/XLA (every backend, every fallback).

The sequence is cut into chunks of C tokens. Everything that does not depend on the state
carried into a chunk is computed for all chunks at once with matmuls; a `lax.scan` over
chunks then passes the state along (Yang et al. 2024, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length", §3; Gated DeltaNet, Yang et al. 2025, §3.3;
flash-linear-attention's `chunk_gated_delta_rule`).

Inside a chunk, with S_0 the state carried in, positions i, j = 1..C and
`G_i = Σ_{s≤i} g_s` the log decay since the chunk start:

    Γ_ij = exp(G_i - G_j) for j ≤ i (else 0)      decay from token j to token i
    γ_i  = exp(G_i)                                 decay from the chunk start to token i

Delta rules (WY/UT representation). Writing `S_i = γ_i S_0 + Σ_{j≤i} Γ_ij k_j u_j^T`, the
recurrence gives `u_i = β_i (v_i - γ_i S_0^T k_i - Σ_{j<i} Γ_ij (k_i·k_j) u_j)`, i.e.

    A = tril(diag(β) (Γ ⊙ K K^T), -1)
    T = (I + A)^{-1} diag(β)                        (unit lower triangular inverse)
    W = T (γ ⊙ K),   U = T V                        (γ ⊙ K scales row i by γ_i)
    U_new = U - W S_0                               (the "new values" of the chunk)

Additive rules (linear attention, simple GLA): U_new = V.

Then, for all rules,

    O   = scale · ((γ ⊙ Q) S_0 + tril(Γ ⊙ Q K^T) U_new)
    S_C = γ_C S_0 + (exp(G_C - G) ⊙ K)^T U_new

Decays are exponentiated only on the causal side (j ≤ i), where `G_i - G_j` sums log
decays that are ≤ 0 for the intended inputs, so nothing overflows, and relative to the
chunk start so long sequences never underflow the carried state. `G_i - G_j` is summed
directly over (j, i] rather than subtracted, so strong decays keep their precision.

Packed sequences: a reset before token t is a decay of -inf there. That is exact and needs
no -inf arithmetic: with `r_i` the number of resets at or before position i in the chunk,
Γ_ij is kept only where r_i = r_j, γ_i only where r_i = 0, and likewise for the end decays.
Padding tokens (k = 0, β = 0, g = 0) leave the state unchanged.

How much of this runs at once is a choice of layout, not of math (`chunks_per_step`): on
accelerators every chunk's matrices are built in one go and only the state recurrence is a
scan; on CPU the scan steps through the chunks one at a time with all of a chunk's work
inside the step, recomputed in the backward, which keeps the working set in cache.

Matmuls use JAX's default precision (`jax_default_matmul_precision`): full float32 on CPU;
on TPU / recent GPUs the default multiplies float32 in bf16 passes / TF32.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.linear_memory.reference import segment_resets


def _masked_exp(log_values, mask):
    """exp where mask, 0 elsewhere; masked entries never reach exp (no inf, no NaN grads)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, log_values, 0.0)), 0.0)


def _pairwise_decay_log(g):
    """L_ij = Σ_{j<s≤i} g_s = G_i - G_j for i ≥ j (0 elsewhere), g: [..., C].

    Summed directly as a masked cumulative sum (Mamba-2's "segsum") instead of subtracting
    two cumulative sums: after a strong decay both G_i and G_j are large and their
    difference would lose most of its float32 digits.
    """
    chunk_size = g.shape[-1]
    positions = jnp.arange(chunk_size)
    strictly_lower = positions[:, None] > positions[None, :]
    terms = jnp.where(strictly_lower, g[..., :, None], 0.0)  # terms[s, j] = g_s for s > j
    return jnp.cumsum(terms, axis=-2)


@jax.custom_vjp
def unit_lower_inverse(strictly_lower):
    """(I + A)^{-1} for strictly lower triangular A ([..., C, C]), by recursive blocking.

    Only A's strictly lower entries are read. Its gradient is written out
    (`_unit_lower_inverse_backward`): differentiating the blocking itself made the
    backward of the whole chunked recurrence ~1.25x slower on CPU.

    Diagonal blocks are inverted bottom-up, doubling their size each level:
    inv([[L11, 0], [L21, L22]]) = [[X11, 0], [-X22 L21 X11, X22]] with X = inv(L), so log2(C)
    levels of batched matmuls, numerically as benign as forward substitution. (Not a LAPACK
    triangular solve: jaxlib's CPU one runs on a thread pool and was seen to deadlock under
    concurrent use. Not the Neumann product (I - A)(I + A^2)...: its powers of A have
    binomially large entries, and float32 cancellation gave NaNs for repeated keys.)
    """
    chunk = strictly_lower.shape[-1]
    size = 1 << (chunk - 1).bit_length()  # next power of two; padding is the identity
    pad = [(0, 0)] * (strictly_lower.ndim - 2) + [(0, size - chunk)] * 2
    lower = jnp.pad(strictly_lower, pad) + jnp.eye(size, dtype=strictly_lower.dtype)
    batch_shape = lower.shape[:-2]
    inverse = jnp.ones(batch_shape + (size, 1, 1), lower.dtype)  # inverses of 1x1 blocks
    block = 1
    while block < size:
        pairs = size // (2 * block)
        grid = lower.reshape(batch_shape + (pairs, 2 * block, pairs, 2 * block))
        diagonal = jnp.moveaxis(jnp.diagonal(grid, axis1=-4, axis2=-2), -1, -3)
        lower_left = diagonal[..., block:, :block]  # L21 of each pair, [..., pairs, b, b]
        upper, lower_right = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        off_diagonal = -lower_right @ lower_left @ upper
        top = jnp.concatenate([upper, jnp.zeros_like(upper)], axis=-1)
        bottom = jnp.concatenate([off_diagonal, lower_right], axis=-1)
        inverse = jnp.concatenate([top, bottom], axis=-2)
        block *= 2
    return inverse[..., 0, :chunk, :chunk]


def _unit_lower_inverse_forward(strictly_lower):
    inverse = unit_lower_inverse(strictly_lower)
    return inverse, inverse


def _unit_lower_inverse_backward(inverse, cotangent):
    """X = (I + A)^{-1} gives dX = -X dA X, so the cotangent of A is -X^T dX̄ X^T, kept
    on the strictly lower entries (the only ones the forward reads)."""
    transposed = jnp.swapaxes(inverse, -1, -2)
    return (jnp.tril(-(transposed @ cotangent @ transposed), -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_forward, _unit_lower_inverse_backward)


def _pad_time(x, padded_length):
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, padded_length - x.shape[1])
    return jnp.pad(x, pad)


def chunks_per_step_default() -> int | None:
    """Chunks per step of the scan (`recurrence`): 1 on CPU, None (all at once) elsewhere.

    On CPU the [B, H, N, C, C] intermediates of all chunks at once outgrow the caches as T
    grows; one chunk per step, recomputed in the backward, keeps a step's working set in
    cache and the time linear in T (measured on one core:
    `benchmarks/results/linear_memory_chunking.md`). Accelerators want the opposite: as
    much parallel work per op as possible."""
    return 1 if jax.default_backend() == "cpu" else None


def recurrence(
    q, k, v, g=None, beta=None, *, scale, initial_state=None, segment_ids=None, chunk_size=64,
    chunks_per_step="auto",
):  # fmt: skip
    """Chunk-parallel version of `reference.recurrence` (same arguments and results).

    `g=None` means no decay, `beta=None` the additive update `S += k v^T`; see the module
    docstring for the equations. Internally float32; `o` is returned in v's dtype.
    chunks_per_step: how many chunks each step of the scan over the sequence computes at
    once (None: all, in one step; "auto": `chunks_per_step_default()`). With fewer than
    all, each step is recomputed in the backward (`jax.checkpoint`), so only the chunk
    inputs and the states between steps are kept. Every choice computes the same thing.
    """
    batch_size, length, num_heads, key_dim = q.shape
    value_dim, out_dtype = v.shape[-1], v.dtype
    f32 = jnp.float32
    if g is None:
        g = jnp.zeros((batch_size, length, num_heads), f32)
    if initial_state is None:
        initial_state = jnp.zeros((batch_size, num_heads, key_dim, value_dim), f32)
    resets = segment_resets(segment_ids, batch_size, length)

    # Pad to whole chunks with tokens that leave the state unchanged: zero q, k, v, g, β;
    # resets are padded with False so the last segment simply runs on.
    num_chunks = -(-length // chunk_size)
    if chunks_per_step == "auto":
        chunks_per_step = chunks_per_step_default()
    per_step = min(chunks_per_step or num_chunks, num_chunks)
    num_steps = -(-num_chunks // per_step)
    padded = num_steps * per_step * chunk_size
    q, k, v, g = (_pad_time(x.astype(f32), padded) for x in (q, k, v, g))
    resets = _pad_time(resets, padded)[:, :, None]  # shared by the heads
    inputs = [q, k, v, g, resets] + ([] if beta is None else [_pad_time(beta.astype(f32), padded)])

    def chunk_steps(x):  # [B, T, H, ...] -> [steps, B, H, chunks per step, C, ...]
        x = x.reshape(batch_size, num_steps, per_step, chunk_size, *x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 4, 2), 1, 0)

    def step(state, chunk_inputs):
        o, state = _chunks(state, *chunk_inputs, scale=scale)
        return state, o

    if num_steps == 1:
        final_state, o = step(initial_state.astype(f32), [chunk_steps(x)[0] for x in inputs])
        o = o[None]
    else:
        final_state, o = jax.lax.scan(
            jax.checkpoint(step), initial_state.astype(f32), [chunk_steps(x) for x in inputs]
        )
    # [steps, B, H, chunks per step, C, Dv] -> [B, T, H, Dv]
    o = jnp.moveaxis(jnp.moveaxis(o, 0, 1), 2, 4).reshape(batch_size, padded, num_heads, value_dim)
    return o[:, :length].astype(out_dtype), final_state


def _chunks(initial_state, q, k, v, g, resets, beta=None, *, scale):
    """The recurrence over N consecutive chunks from `initial_state`: inputs [B, H, N, C, ...]
    (resets [B, 1, N, C]) -> (o [B, H, N, C, Dv], the state after the last chunk)."""
    value_dim, chunk_size = v.shape[-1], q.shape[-2]
    use_delta = beta is not None
    reset_count = jnp.cumsum(resets, axis=-1)  # resets at or before each position

    decay_log = jnp.cumsum(g, axis=-1)  # G_i, [B, H, N, C]
    pair_log = _pairwise_decay_log(g)  # G_i - G_j, [B, H, N, C, C]
    positions = jnp.arange(chunk_size)
    causal = positions[:, None] >= positions[None, :]
    same_segment = reset_count[..., :, None] == reset_count[..., None, :]
    gamma = _masked_exp(pair_log, causal & same_segment)  # Γ
    start_decay = _masked_exp(decay_log, reset_count == 0)  # γ_i
    end_log = pair_log[..., -1, :]  # G_C - G_j
    end_decay = _masked_exp(end_log, reset_count == reset_count[..., -1:])
    chunk_decay = _masked_exp(decay_log[..., -1], reset_count[..., -1] == 0)  # γ_C

    if use_delta:
        key_gram = jnp.einsum("bhnik,bhnjk->bhnij", k, k)
        strictly_lower = positions[:, None] > positions[None, :]
        a_matrix = jnp.where(strictly_lower, beta[..., :, None] * gamma * key_gram, 0.0)
        # One solve for both right-hand sides: [U | W] = (I + A)^{-1} diag(β) [V | γ ⊙ K].
        rhs = beta[..., None] * jnp.concatenate([v, start_decay[..., None] * k], axis=-1)
        solved = unit_lower_inverse(a_matrix) @ rhs
        values, w_matrix = solved[..., :value_dim], solved[..., value_dim:]
    else:
        values, w_matrix = v, None

    decayed_keys = end_decay[..., None] * k  # exp(G_C - G_j) k_j

    def chunk_step(state, chunk):
        values_c, w_c, decayed_keys_c, chunk_decay_c = chunk
        if use_delta:
            values_c = values_c - jnp.einsum("bhck,bhkv->bhcv", w_c, state)
        next_state = chunk_decay_c[..., None, None] * state + jnp.einsum(
            "bhck,bhcv->bhkv", decayed_keys_c, values_c
        )
        return next_state, (state, values_c)

    def chunk_major(x):
        return None if x is None else jnp.moveaxis(x, 2, 0)

    scanned = tuple(chunk_major(x) for x in (values, w_matrix, decayed_keys, chunk_decay))
    if q.shape[2] == 1:  # one chunk: no inner scan
        final_state, (start_states, new_values) = chunk_step(
            initial_state, tuple(None if x is None else x[0] for x in scanned)
        )
        start_states, new_values = start_states[:, :, None], new_values[:, :, None]
    else:
        final_state, (start_states, new_values) = jax.lax.scan(chunk_step, initial_state, scanned)
        start_states = jnp.moveaxis(start_states, 0, 2)  # [B, H, N, Dk, Dv]
        new_values = jnp.moveaxis(new_values, 0, 2)  # [B, H, N, C, Dv]

    intra = gamma * jnp.einsum("bhnik,bhnjk->bhnij", q, k)
    o = jnp.einsum("bhnck,bhnkv->bhncv", start_decay[..., None] * q, start_states)
    o = scale * (o + jnp.einsum("bhnij,bhnjv->bhniv", intra, new_values))
    return o, final_state
