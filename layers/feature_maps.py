"""Feature maps φ on the keys and queries of a deep memory (ATLAS, Behrouz et al. 2025,
arXiv 2505.23735, §3.1 "polynomial mappings"). Two are named by `NeuralMemory(feature_map=)`:

"monomial" — the paper's map (`MonomialFeatureMap`). ATLAS §3.1 defines

    φ_p(x) = [x^β]_{|β| <= p}                     (every monomial of degree <= p)

so a memory over d-dimensional keys sees O(d^p) features, and a matrix memory's capacity
(the most linearly independent key-value pairs it maps exactly) grows from O(d_k) to
O(d_k^p). Here, per degree i = 1..p, the monomials x_{j1} x_{j2} ... x_{ji} with
j1 <= j2 <= ... <= ji (one per multiset, so no duplicates), each weighted by
sqrt(i! / (m_1! m_2! ...)) (m_j: how often index j occurs) — the weight that makes the
degree-i block's dot product (q·k)^i exactly, since (q·k)^i = Σ_β multinomial(i; β) q^β k^β.
Degree-major order, lexicographic inside a degree (itertools.combinations_with_replacement),
so φ(x)[:d] is the degree-1 block s_1 x. With a learnable scale s_i per degree and head,

    φ(x) = [s_1 x, s_2 m_2(x), ..., s_p m_p(x)],    φ(q)·φ(k) = Σ_{i=1..p} s_i^2 (q·k)^i

of dimension Dk = Σ_{i=1..p} C(d+i-1, i) (d = 16, p = 2: 152; p = 3: 968).
Initialisation: ATLAS initialises its coefficients to 1/i!, the Taylor coefficients of
exp, so that the kernel starts as a truncated exponential (softmax's) kernel. The
coefficient of (q·k)^i in φ(q)·φ(k) is s_i^2, so s_i starts at 1/sqrt(i!) and the kernel
at Σ_i (q·k)^i / i! = exp(q·k) - 1 truncated at degree p. (Reading: the paper's own text
could not be opened from this project's search tools — only its abstract and secondary
summaries, which agree on φ_p, the O(d_k^p) capacity and the 1/i! initialisation. We
assumed the 1/i! are the kernel's coefficients, not the features'; with a_i = 1/i! on the
features the kernel would start at Σ (q·k)^i / (i!)^2, which is not exp's series.)
No constant monomial (|β| = 0): a constant feature is a bias on every key, and without it
degree 1 with s_1 = 1 is exactly the identity (Titans is the p = 1 corner).

"polynomial" — the element-wise map this codebase shipped first, kept (under its name, so
configs and checkpoints keep working) as a documented departure:

    φ(x) = Σ_{i=1..p} a_i x^{⊙i}                 (x^{⊙i}: element-wise power)

with a_i initialised to 1/i!. It keeps the head dimension (the memory's cost does not grow
with p, and the MLP memory's residual x + LN(z) keeps d_in = d_out), but it adds no
dimensions, so it cannot raise capacity past O(d): it is a learned element-wise
non-linearity, not the paper's feature map. `benchmarks/results/atlas_features.md`
measures the two.

Both learn their coefficients per head, shared by keys and queries (φ(q)·φ(k) stays a
symmetric kernel), in float32.

Where φ is applied: *after* the per-head ℓ2 normalisation of q and k (`NeuralMemory`).
A unit vector has entries in [-1, 1], so every power is bounded by 1 and ‖φ(x)‖ <= Σ|a_i|
(monomial: ‖φ(x)‖^2 = Σ s_i^2 exactly) whatever the input scale: the inner step sizes
(θ <= lr_max) keep their meaning and a degree-5 map cannot blow up on a large activation.
Applied before the normalisation, the normalisation would undo the coefficients' scale and
amplify the higher powers of a large x without bound before it. The price for the
element-wise map: for a unit vector in d dimensions the entries are ~d^-1/2, so the higher
powers start small (~d^-i/2) and the coefficients have to grow to make them matter (the
monomial map has no such problem: its degree-i block has norm 1 on a unit vector).
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.sharding import with_logical_axes

FEATURE_MAPS = ("identity", "polynomial", "monomial")


def taylor_coefficients(degree: int) -> jax.Array:
    """[1/1!, 1/2!, ..., 1/p!]: the init of a_1..a_p (Taylor series of exp(x) - 1)."""
    return jnp.array([1.0 / math.factorial(i) for i in range(1, degree + 1)], jnp.float32)


def polynomial_features(x: jax.Array, coefficients: jax.Array) -> jax.Array:
    """φ(x) = Σ_i a_i x^i element-wise: x [B, T, H, D], coefficients [H, p] -> like x.

    Computed in float32 (the powers of a bfloat16 x lose digits fast), cast back to x's dtype.
    """
    x32 = x.astype(jnp.float32)
    power, total = x32, 0.0
    for index in range(coefficients.shape[-1]):
        if index > 0:
            power = power * x32
        total = total + coefficients[:, index, None] * power  # [H, 1] broadcasts over D
    return total.astype(x.dtype)


class PolynomialFeatureMap(nnx.Module):
    """The element-wise polynomial map of degree p, "polynomial" (module docstring: a
    departure from ATLAS's φ_p, which `MonomialFeatureMap` is).

    __call__(x [B, T, H, D]) -> φ(x), same shape and dtype. Parameter `coefficients`
    [H, p] float32, logical axes ("heads", None), initialised to 1/i!.
    """

    def __init__(self, num_heads: int, degree: int):
        if degree < 1:
            raise ValueError(f"polynomial feature map degree={degree}; expected >= 1")
        self.degree = degree
        init = with_logical_axes(
            lambda key, shape, dtype: jnp.broadcast_to(taylor_coefficients(shape[-1]), shape),
            "heads",
            None,
        )
        self.coefficients = nnx.Param(init(None, (num_heads, degree), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return polynomial_features(x, self.coefficients[...])


def check_degree(degree, name: str = "feature map"):
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        raise ValueError(f"{name} degree={degree!r}; expected an int >= 1")


def monomial_dim(dim: int, degree: int) -> int:
    """Dk = Σ_{i=1..p} C(d+i-1, i): how many monomials of degree 1..p in d variables."""
    return sum(math.comb(dim + i - 1, i) for i in range(1, degree + 1))


def feature_dim(feature_map: str, dim: int, degree: int) -> int:
    """The key/query width the memory sees after `feature_map` on d-dimensional heads."""
    return monomial_dim(dim, degree) if feature_map == "monomial" else dim


def monomial_indices(dim: int, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Degree-`degree` monomials: (indices [n, degree] int32, weights [n] float32).

    Rows are combinations_with_replacement(range(dim), degree) in order; weight =
    sqrt(multinomial(degree; multiplicities)), so Σ_rows w^2 Π q_j Π k_j = (q·k)^degree.
    """
    rows = list(itertools.combinations_with_replacement(range(dim), degree))
    weights = []
    for row in rows:
        multiplicities = [row.count(index) for index in set(row)]
        count = math.factorial(degree)
        for multiplicity in multiplicities:
            count //= math.factorial(multiplicity)
        weights.append(math.sqrt(count))
    return np.asarray(rows, np.int32).reshape(len(rows), degree), np.asarray(weights, np.float32)


def monomial_features(x: jax.Array, scales: jax.Array) -> jax.Array:
    """ATLAS's φ_p (module docstring): x [B, T, H, d], scales [H, p] -> [B, T, H, Dk].

    Computed in float32 (products of bfloat16 entries lose digits fast), cast back to x's dtype.
    """
    x32 = x.astype(jnp.float32)
    blocks = []
    for index in range(scales.shape[-1]):
        rows, weights = monomial_indices(x.shape[-1], index + 1)
        product = x32[..., rows[:, 0]]
        for column in range(1, index + 1):  # a running product: exact gradients at zeros
            product = product * x32[..., rows[:, column]]
        blocks.append(scales[:, index, None] * (weights * product))  # [H, 1] over monomials
    return jnp.concatenate(blocks, axis=-1).astype(x.dtype)


class MonomialFeatureMap(nnx.Module):
    """ATLAS's φ_p(x) = [x^β]_{|β| <= p} with a learnable scale per degree (module docstring).

    __call__(x [B, T, H, d]) -> φ(x) [B, T, H, Dk] in x's dtype, Dk = monomial_dim(d, p); its
    first d features are s_1 x. Parameter `coefficients` [H, p] float32 (the scales s_i),
    logical axes ("heads", None), initialised to 1/sqrt(i!) (kernel Σ (q·k)^i / i!).
    """

    def __init__(self, num_heads: int, degree: int):
        check_degree(degree, "monomial feature map")
        self.degree = degree
        init = with_logical_axes(
            lambda key, shape, dtype: jnp.broadcast_to(
                jnp.sqrt(taylor_coefficients(shape[-1])), shape
            ),
            "heads",
            None,
        )
        self.coefficients = nnx.Param(init(None, (num_heads, degree), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return monomial_features(x, self.coefficients[...])


def make_feature_map(feature_map: str, num_heads: int, degree: int):
    """The module for a `FEATURE_MAPS` name (None for "identity"); ValueError names the option."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map={feature_map!r}; expected one of {FEATURE_MAPS}")
    if feature_map == "identity":
        return None
    check_degree(degree, f"{feature_map} feature map (feature_degree)")
    if feature_map == "monomial":
        return MonomialFeatureMap(num_heads, degree)
    return PolynomialFeatureMap(num_heads, degree)
