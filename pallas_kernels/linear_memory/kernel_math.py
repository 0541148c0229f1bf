"""Per-chunk math shared by the Pallas kernels (TPU `tpu.py`, GPU `gpu.py`).

These functions see one chunk of one (batch, head): 2-D float32 blocks, plus the per-token
scalars in two layouts, as a column `[C, 1]` and as a row `[1, C]` (a kernel cannot cheaply
transpose a vector, so the caller loads both). They use only ops that both Mosaic TPU and
Triton lower: 2-D matmuls, elementwise ops, keepdims reductions, `where` and `fori_loop`.

Forward, per chunk (the equations of `chunked.py`; Yang et al. 2024 §3, Gated DeltaNet
Yang et al. 2025 §3.3), with S_0 the state carried in:

    A   = tril(diag(β) (Γ ⊙ K K^T), -1),   T = (I + A)^{-1}
    W   = T diag(β) (γ ⊙ K),   U = T diag(β) V,   U_new = U - W S_0     (delta rules)
    U_new = V                                                           (additive rules)
    O   = scale · ((γ ⊙ Q) S_0 + (Γ ⊙ Q K^T) U_new)
    S_C = γ_C S_0 + (e ⊙ K)^T U_new,   e_j = exp(G_C - G_j)

`(I + A)^{-1}` is found by forward substitution over the rows (no triangular solve inside a
kernel). The backward is the hand-derived reverse of these lines (`chunk_backward`); the
decay gradients come out per position of the in-chunk cumulative log decay G, split into
a column part and a row part (each kernel writes both; the wrapper adds them).
"""

import jax
import jax.numpy as jnp


def _matmul(a, b, precision, contract=(1, 0)):
    """a @ b with a's dim contract[0] and b's dim contract[1] contracted; float32 result."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _mm(a, b, precision):  # a b
    return _matmul(a, b, precision)


def _mm_tn(a, b, precision):  # a^T b
    return _matmul(a, b, precision, (0, 0))


def _mm_nt(a, b, precision):  # a b^T
    return _matmul(a, b, precision, (1, 1))


def _row_sum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _col_sum(x):
    return jnp.sum(x, axis=0, keepdims=True)


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _masked_exp(log_values, mask):
    """exp where mask, 0 elsewhere; masked entries never reach exp (no inf, no NaN)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, log_values, 0.0)), 0.0)


def _as_f32(mask):
    return mask.astype(jnp.float32)


def chunk_decays(g_col, g_row, resets_col, resets_row, *, has_decay, precision):
    """Decays of one chunk from its log decays g and in-chunk reset counts r.

    Returns (Γ, Γ^T [C, C], γ, e [C, 1], γ_C [1, 1]); entries that cross a segment reset
    are 0 (a reset is a decay of exp(-inf)). The pairwise log decays
    L_ij = Σ_{j<s≤i} g_s are summed directly, as the matmul (tril ⊙ g) · strict_tril
    (exact products of 0/1 and g), instead of G_i - G_j: after strong decays both G are
    large and their difference would lose most of its float32 digits (chunked.py's segsum).
    """
    chunk = g_col.shape[0]
    rows, cols = _iota((chunk, chunk), 0), _iota((chunk, chunk), 1)
    same_segment = resets_col == resets_row
    lower, upper = (rows >= cols) & same_segment, (cols >= rows) & same_segment
    is_last = _iota((1, chunk), 1) == chunk - 1
    resets_last = _row_sum(jnp.where(is_last, resets_row, 0.0))
    start_mask, end_mask = resets_col == 0, resets_col == resets_last
    if not has_decay:
        masks = (lower, upper, start_mask, end_mask, resets_last == 0)
        return tuple(_as_f32(mask) for mask in masks)
    pair_log = _mm(jnp.where(cols <= rows, g_row, 0.0), _as_f32(rows > cols), precision)
    pair_log_t = _mm(jnp.where(cols > rows, g_row, 0.0), _as_f32(rows <= cols), precision)
    gamma = _masked_exp(pair_log, lower)
    gamma_t = _masked_exp(pair_log_t, upper)
    decay_col = _row_sum(jnp.where(cols <= rows, g_row, 0.0))  # G_i = Σ_{s≤i} g_s
    end_log = _row_sum(jnp.where(cols == chunk - 1, pair_log_t, 0.0))  # Σ_{s>j} g_s
    start = _masked_exp(decay_col, start_mask)
    end = _masked_exp(end_log, end_mask)
    chunk_decay = _masked_exp(_row_sum(g_row), resets_last == 0)
    return gamma, gamma_t, start, end, chunk_decay


def decay_gradient(d_gamma_log, d_start_log, d_end_log, d_chunk_log, precision):
    """dg from the gradients of the log decays: dL = dΓ ⊙ Γ [C, C], dγ ⊙ γ and de ⊙ e
    [C, 1], dγ_C γ_C [1, 1]. Returned split as (column [C, 1], row [1, C]); dg = sum."""
    chunk = d_gamma_log.shape[0]
    rows, cols = _iota((chunk, chunk), 0), _iota((chunk, chunk), 1)
    # L_ij = Σ_s [s ≤ i] g_s [s > j]  =>  dg_s = Σ_j (tril^T dL)_sj [s > j].
    d_g_col = _row_sum(_mm_tn(_as_f32(cols <= rows), d_gamma_log, precision) * (rows > cols))
    # G_i = Σ_{s≤i} g_s; e_j's log Σ_{s>j} g_s; γ_C's log Σ_s g_s.
    d_g_row = _col_sum(jnp.where(rows >= cols, d_start_log, 0.0))
    d_g_row += _col_sum(jnp.where(rows < cols, d_end_log, 0.0)) + d_chunk_log
    return d_g_col, d_g_row


def unit_lower_inverse(a, a_t):
    """(I + A)^{-1} for strictly lower A, by forward substitution over rows.

    With P = (I + A)^{-1} - I: P_i = -A_i - Σ_{m<i} A_im P_m. Row i of A is read as a row
    from `a` and as a column from `a_t` = A^T, so no vector transpose is needed.
    """
    chunk = a.shape[0]
    rows, cols = _iota((chunk, chunk), 0), _iota((chunk, chunk), 1)

    def substitute_row(i, p):
        a_row = _col_sum(jnp.where(rows == i, a, 0.0))  # A_i as [1, C]
        a_col = _row_sum(jnp.where(cols == i, a_t, 0.0))  # A_i as [C, 1]
        new_row = -a_row - _col_sum(a_col * p)
        return jnp.where(rows == i, new_row, p)

    p = jax.lax.fori_loop(1, chunk, substitute_row, jnp.zeros_like(a))
    return p + (rows == cols).astype(a.dtype)


def _ut_transform(k, beta_col, beta_row, gamma, gamma_t, precision):
    """(T, K K^T, Γ ⊙ K K^T) of the UT/WY representation (chunked.py's A and T)."""
    chunk = k.shape[0]
    rows, cols = _iota((chunk, chunk), 0), _iota((chunk, chunk), 1)
    key_gram = _mm_nt(k, k, precision)
    decayed_gram = gamma * key_gram
    a = jnp.where(rows > cols, beta_col * decayed_gram, 0.0)
    a_t = jnp.where(cols > rows, beta_row * (gamma_t * key_gram), 0.0)
    return unit_lower_inverse(a, a_t), key_gram, decayed_gram


def chunk_forward(q, k, v, state, scalars, *, scale, has_decay, has_delta, precision):
    """One chunk forward. scalars = (g_col, g_row, r_col, r_row, β_col, β_row).

    Returns (o [C, Dv], next state [Dk, Dv]), all float32.
    """
    g_col, g_row, resets_col, resets_row, beta_col, beta_row = scalars
    gamma, gamma_t, start, end, chunk_decay = chunk_decays(
        g_col, g_row, resets_col, resets_row, has_decay=has_decay, precision=precision
    )
    if has_delta:
        t_matrix, _, _ = _ut_transform(k, beta_col, beta_row, gamma, gamma_t, precision)
        w = _mm(t_matrix, beta_col * start * k, precision)
        u = _mm(t_matrix, beta_col * v, precision)
        new_values = u - _mm(w, state, precision)
    else:
        new_values = v
    intra = gamma * _mm_nt(q, k, precision)
    o = _mm(start * q, state, precision) + _mm(intra, new_values, precision)
    next_state = chunk_decay * state + _mm_tn(end * k, new_values, precision)
    return scale * o, next_state


def chunk_backward(
    q, k, v, state, d_o, d_next_state, scalars, *, scale, has_decay, has_delta, precision
):
    """Reverse of `chunk_forward`, recomputing its intermediates from the carried-in state.

    Returns (dq, dk, dv, dg_col [C, 1], dg_row [1, C], dβ_col [C, 1], d_state [Dk, Dv]);
    the gradient of the log decays is dg_col + dg_row^T (zero without decay).
    """
    g_col, g_row, resets_col, resets_row, beta_col, beta_row = scalars
    chunk = q.shape[0]
    gamma, gamma_t, start, end, chunk_decay = chunk_decays(
        g_col, g_row, resets_col, resets_row, has_decay=has_decay, precision=precision
    )
    query_key = _mm_nt(q, k, precision)
    if has_delta:
        t_matrix, key_gram, decayed_gram = _ut_transform(
            k, beta_col, beta_row, gamma, gamma_t, precision
        )
        keys_in = beta_col * start * k  # W = T keys_in
        values_in = beta_col * v  # U = T values_in
        w = _mm(t_matrix, keys_in, precision)
        new_values = _mm(t_matrix, values_in, precision) - _mm(w, state, precision)
    else:
        new_values = v

    # O = scale((γ ⊙ Q) S_0 + P U_new), P = Γ ⊙ Q K^T;  S_C = γ_C S_0 + (e ⊙ K)^T U_new.
    d_new_values = scale * _mm_tn(gamma * query_key, d_o, precision)
    d_new_values += _mm(end * k, d_next_state, precision)
    d_intra = scale * _mm_nt(d_o, new_values, precision) * gamma  # dP ⊙ Γ
    d_query_start = scale * _mm_nt(d_o, state, precision)  # d(γ ⊙ Q)
    dq = start * d_query_start + _mm(d_intra, k, precision)
    dk = _mm_tn(d_intra, q, precision)
    d_gamma_log = d_intra * query_key  # dΓ ⊙ Γ
    d_start_log = _row_sum(d_query_start * q) * start  # dγ ⊙ γ
    d_state = scale * _mm_tn(start * q, d_o, precision) + chunk_decay * d_next_state
    d_end_keys = _mm_nt(new_values, d_next_state, precision)  # d(e ⊙ K)
    dk += end * d_end_keys
    d_end_log = _row_sum(d_end_keys * k) * end  # de ⊙ e
    d_chunk_log = _col_sum(_row_sum(state * d_next_state)) * chunk_decay  # dγ_C γ_C

    if has_delta:
        d_w = -_mm_nt(d_new_values, state, precision)
        d_state -= _mm_tn(w, d_new_values, precision)
        d_t = _mm_nt(d_new_values, values_in, precision) + _mm_nt(d_w, keys_in, precision)
        d_values_in = _mm_tn(t_matrix, d_new_values, precision)
        d_keys_in = _mm_tn(t_matrix, d_w, precision)
        dv = beta_col * d_values_in
        dk += beta_col * start * d_keys_in
        d_beta = _row_sum(d_values_in * v) + _row_sum(d_keys_in * start * k)
        d_start_log += _row_sum(d_keys_in * beta_col * k) * start
        # T = (I + A)^{-1}: dA = -T^T dT T^T, kept on A's strictly lower support.
        rows, cols = _iota((chunk, chunk), 0), _iota((chunk, chunk), 1)
        d_a = -_mm_tn(t_matrix, _mm_nt(d_t, t_matrix, precision), precision)
        d_a = jnp.where(rows > cols, d_a, 0.0)
        d_beta += _row_sum(d_a * decayed_gram)
        d_decayed_gram = d_a * beta_col  # d(Γ ⊙ K K^T)
        d_gamma_log += d_decayed_gram * decayed_gram
        d_key_gram = d_decayed_gram * gamma
        dk += _mm(d_key_gram, k, precision) + _mm_tn(d_key_gram, k, precision)
    else:
        dv = d_new_values
        d_beta = jnp.zeros_like(g_col)

    if has_decay:
        d_g_col, d_g_row = decay_gradient(
            d_gamma_log, d_start_log, d_end_log, d_chunk_log, precision
        )
    else:
        d_g_col, d_g_row = jnp.zeros_like(g_col), jnp.zeros_like(g_row)
    return dq, dk, dv, d_g_col, d_g_row, d_beta, d_state
