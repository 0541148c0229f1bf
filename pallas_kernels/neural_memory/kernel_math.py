"""Per-chunk math of the deep-memory Pallas kernels (TPU `tpu.py`, GPU `gpu.py`).

One chunk of b tokens of one (batch, head) of the Titans memory (MLP of depth 2, l2
attentional bias, gated decay, GD + momentum), as `chunked.chunk_step` computes it
(Titans §3.2, eqs. 16-18), written with ops both Mosaic TPU and Triton lower: 2-D matmuls
whose sides are all >= 16 (b, D, E·D; never a matrix-vector product), elementwise ops,
keepdims reductions and `where`. Per-token scalars come in twice, as a column `[b, 1]` and
a row `[1, b]`, because a kernel cannot cheaply transpose a vector.

The state is four float32 `[D, E·D]` matrices: W1, W2^T, S1, S2^T (W2 and its momentum are
kept transposed so all four share a shape and one buffer). With u_i the gradient of
1/2 ||M(k_i) - v_i||^2 at the decayed chunk-start memory gamma_i M_{c0}:

    A[t, j] = prod_{j<m<=t} exp(g_m),  P[j, i] = prod_{i<m<=j} eta_m   (`chain_products`)
    Gamma_t = exp(sum_{m<=t} g_m),  E_j = prod_{m<=j} eta_m,  C = A P,  D = A E
    M_t = Gamma_t M_{c0} + sum_{i<=t} C[t, i] (-theta_i u_i) + D_t S_{c0}
    S_t = E_t S_{c0} + sum_{i<=t} P[t, i] (-theta_i u_i)

and layer l of M_t applied to x is the masked matmul of chunked.py:
x W_{l,t} = Gamma_t x W_{l,c0} + sum_i C[t,i] (-theta_i) (x . a_{l,i}) delta_{l,i} + D_t x S_{l,c0}.

GELU: Triton has no erf, so both kernels use Eigen's / XLA's float32 rational approximation
of erf (|error| < 2e-7 on the real line; XLA:CPU evaluates `lax.erf` with the same
polynomials), the same formula on every platform.
"""

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory import choices

# Eigen / XLA float32 erf: erf(x) = x alpha(x^2) / beta(x^2) on [-4, 4] (clamped outside,
# where erf is +-1 in float32). Highest-degree coefficient first.
_ERF_ALPHA = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_BETA = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def _horner(coefficients, x):
    result = jnp.full_like(x, coefficients[0])
    for coefficient in coefficients[1:]:
        result = result * x + coefficient
    return result


def erf(x):
    """float32 erf from the rational approximation above (lowers on Mosaic and Triton)."""
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    return x * _horner(_ERF_ALPHA, x2) / _horner(_ERF_BETA, x2)


def gelu(x):
    """Exact GELU x Phi(x) (as `choices.gelu`), erf from `erf` above."""
    return x * 0.5 * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_derivative(x):
    """Phi(x) + x phi(x) (as `choices.gelu_derivative`)."""
    cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
    return cdf + x * jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


# name -> (sigma, sigma'); SiLU needs only exp (jax.nn.sigmoid lowers on both platforms).
ACTIVATIONS = {
    "gelu": (gelu, gelu_derivative),
    "silu": (choices.silu, choices.silu_derivative),
}


_CONTRACT = {"nn": (1, 0), "nt": (1, 1), "tn": (0, 0)}  # a b, a b^T, a^T b


def _dot(a, b, precision, kind):
    """2-D matmul of `kind` (see _CONTRACT), float32 result."""
    contract = _CONTRACT[kind]
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot_for_vjp(a, b, precision, kind):
    """`_dot` whose VJP is again written as `_dot`s of the three kinds.

    The generic dot_general transpose rule would add a 2-D `transpose` after most of the
    backward's matmuls (27 per chunk), which Mosaic would have to relayout on small
    unaligned tiles. Only used under `jax.vjp` (Triton has no lowering for a bare
    custom_vjp_call, so the forward kernel uses `_dot`).
    """
    return _dot(a, b, precision, kind)


def _dot_for_vjp_fwd(a, b, precision, kind):
    return _dot(a, b, precision, kind), (a, b)


def _dot_for_vjp_bwd(precision, kind, residuals, g):
    a, b = residuals
    if kind == "nn":  # out = a b
        return _dot(g, b, precision, "nt"), _dot(a, g, precision, "tn")
    if kind == "nt":  # out = a b^T
        return _dot(g, b, precision, "nn"), _dot(g, a, precision, "tn")
    return _dot(b, g, precision, "nt"), _dot(a, g, precision, "nn")  # out = a^T b


_dot_for_vjp.defvjp(_dot_for_vjp_fwd, _dot_for_vjp_bwd)


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _row_sum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _col_sum(x):
    return jnp.sum(x, axis=0, keepdims=True)


def _col_to_row(x):
    """[b, 1] -> [1, b] through a diagonal mask (no vector transpose in a kernel)."""
    size = x.shape[0]
    diagonal = _iota((size, size), 0) == _iota((size, size), 1)
    return _col_sum(jnp.where(diagonal, x, 0.0))


def _row_to_col(x):
    """[1, b] -> [b, 1]."""
    size = x.shape[1]
    diagonal = _iota((size, size), 0) == _iota((size, size), 1)
    return _row_sum(jnp.where(diagonal, x, 0.0))


def chain_products(factors, precision, matmul=_dot):
    """R[t, j] = prod_{j<m<=t} f_m for j <= t (R[t, t] = 1), else 0; factors a column [b, 1].

    R = (I - L)^{-1} = sum_n L^n with L[t, t-1] = f_t, by doubling:
    (I + L)(I + L^2)(I + L^4)... -- log2(b) pairs of b x b matmuls. Every entry is one product
    of the f's (each matmul entry has exactly one nonzero term), so no division, and
    f = 0 (eta = 0, or a decay that underflows) is exact, as `choices.momentum_chunk`'s
    masked cumprod.
    """
    size = factors.shape[0]
    rows, cols = _iota((size, size), 0), _iota((size, size), 1)
    power = jnp.where(rows == cols + 1, factors, 0.0)  # L
    result = (rows == cols).astype(jnp.float32) + power
    span = 2
    while span < size:
        power = matmul(power, power, precision, "nn")
        result = result + matmul(result, power, precision, "nn")
        span *= 2
    return result


def chunk_step(q, k, v, scalars, state, last, *, activation, norm_eps, precision, for_vjp=False):
    """One chunk forward: q, k, v [b, D] float32; scalars = (theta_col, theta_row, eta_col,
    eta_row, g_col, g_row); state = (W1, W2^T, S1, S2^T) [D, E·D]; `last` (int, may be
    traced) the row whose state is returned (b - 1 except in a padded final chunk).

    Returns (o [b, D], (W1, W2^T, S1, S2^T) after token `last`), all float32. `for_vjp`:
    traced under `jax.vjp` (matmuls with transpose-free VJPs, `_dot_for_vjp`).
    """
    matmul = _dot_for_vjp if for_vjp else _dot
    lr_col, lr_row, eta_col, eta_row, g_col, g_row = scalars
    w1, w2t, s1, s2t = state
    act, act_derivative = ACTIVATIONS[activation]
    size = q.shape[0]
    rows, cols = _iota((size, size), 0), _iota((size, size), 1)
    rows_col = _iota((size, 1), 0)

    def mm(a, b):  # a b
        return matmul(a, b, precision, "nn")

    def mm_nt(a, b):  # a b^T
        return matmul(a, b, precision, "nt")

    def mm_tn(a, b):  # a^T b
        return matmul(a, b, precision, "tn")

    # Coefficients (choices.gated_decay_chunk_transfer and choices.momentum_chunk).
    transfer = chain_products(jnp.exp(g_col), precision, matmul)  # A
    momentum_coeff = chain_products(eta_col, precision, matmul)  # P
    gamma = jnp.exp(_row_sum(jnp.where(cols <= rows, g_row, 0.0)))  # Gamma_t [b, 1]
    first_eta = _col_sum(jnp.where(rows_col == 0, eta_col, 0.0))  # [1, 1]
    momentum_carried = _row_sum(jnp.where(cols == 0, momentum_coeff, 0.0)) * first_eta  # E
    carried = _row_sum(transfer * _col_to_row(momentum_carried))  # D = A E, [b, 1]
    update_weight = mm(transfer, momentum_coeff) * (-lr_row)  # C[t, i] (-theta_i)

    # Memory at gamma_i M_{c0} on the keys, and its hand backprop (MemoryArchitecture).
    z1 = gamma * mm(k, w1)
    h1 = act(z1)
    z2 = gamma * mm_nt(h1, w2t)
    error = k + choices.layer_norm(z2, norm_eps) - v  # l2 bias: dl/dM(k) = M(k) - v
    delta2 = choices.layer_norm_vjp(z2, error, norm_eps)
    delta1 = gamma * mm(delta2, w2t) * act_derivative(z1)

    # Retrieval with each token's own weights M_t (chunked.chunk_step's read_layer).
    z1q = gamma * mm(q, w1) + mm(mm_nt(q, k) * update_weight, delta1) + carried * mm(q, s1)
    hq = act(z1q)
    z2q = gamma * mm_nt(hq, w2t) + mm(mm_nt(hq, h1) * update_weight, delta2)
    z2q = z2q + carried * mm_nt(hq, s2t)
    output = q + choices.layer_norm(z2q, norm_eps)

    # State after token `last`: row `last` of every coefficient.
    is_last = rows_col == last

    def at_last(column):  # [b, 1] -> [1, 1]
        return _col_sum(jnp.where(is_last, column, 0.0))

    def row_last(matrix):  # [b, b] -> row `last` as a column [b, 1]
        return _row_to_col(_col_sum(jnp.where(rows == last, matrix, 0.0)))

    decay_last, carried_last, eta_last = at_last(gamma), at_last(carried), at_last(momentum_carried)
    update_last = row_last(update_weight)
    momentum_last = row_last(momentum_coeff) * (-lr_col)
    new_state = (
        decay_last * w1 + mm_tn(k, update_last * delta1) + carried_last * s1,
        decay_last * w2t + mm_tn(update_last * delta2, h1) + carried_last * s2t,
        eta_last * s1 + mm_tn(k, momentum_last * delta1),
        eta_last * s2t + mm_tn(momentum_last * delta2, h1),
    )
    return output, new_state


def chunk_step_backward(q, k, v, scalars, state, last, d_output, d_new_state, **static):
    """VJP of `chunk_step`, recomputing the chunk from its starting state.

    Traced with `jax.vjp` inside the kernel body: the transposed ops are again 2-D matmuls
    (`_dot_for_vjp`'s VJP, no transposes), elementwise ops and reductions, which both
    platforms lower (checked by the export tests).
    Returns (dq, dk, dv, d_scalars (six, as the scalars), d_state (four)).
    """

    def forward(q, k, v, scalars, state):
        return chunk_step(q, k, v, scalars, state, last, for_vjp=True, **static)

    _, pullback = jax.vjp(forward, q, k, v, scalars, state)
    return pullback((d_output, d_new_state))
