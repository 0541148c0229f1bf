"""Feature maps φ on the keys and queries of a deep memory (ATLAS, Behrouz et al. 2025,
arXiv 2505.23735, §3.1 "polynomial mappings").

ATLAS raises the capacity of a memory M by storing φ(k) -> v instead of k -> v, with φ a
polynomial map: the memory then fits a polynomial kernel φ(q)·φ(k) of the keys, not only
their dot product. The paper's learnable variant weights each degree with its own
coefficient,

    φ(x) = Σ_{i=1..p} a_i x^{⊙i}                 (x^{⊙i}: element-wise power)

with a_i initialised to 1/i!, the Taylor coefficients of exp(x) - 1, so that at
initialisation φ(q)·φ(k) behaves like a truncated exponential kernel (the softmax's),
and training can move away from it. The coefficients are learned per head and shared by
keys and queries (φ(q)·φ(k) stays a symmetric kernel). Degree 1 is the identity.

Departures: (1) the paper's φ_p(x) = [x^β]_{|β| ≤ p} lists every monomial of degree <= p
(dimension C(d+p, p)); here the powers are element-wise, so φ(x) keeps the head dimension
— the MLP memory's residual output x + LN(z) needs d_in = d_out, and the memory's cost
does not grow with p. (2) No constant term a_0: a constant feature is a bias on every
key, which the memory's first layer cannot distinguish from content, and dropping it is
what makes degree 1 with a_1 = 1 exactly the identity (so Titans is the p = 1 corner).
The 1/i! initialisation is the one we read in the paper; the search tools of this project
could not show the passage again, so treat it as a documented choice.

Where φ is applied: *after* the per-head ℓ2 normalisation of q and k (`NeuralMemory`).
A unit vector has entries in [-1, 1], so every power is bounded by 1 and ‖φ(x)‖ <= Σ|a_i|
whatever the input scale: the inner step sizes (θ <= lr_max) keep their meaning and a
degree-5 map cannot blow up on a large activation. Applied before the normalisation, the
normalisation would undo the coefficients' scale and amplify the higher powers of a large
x without bound before it. The price: for a unit vector in d dimensions the entries are
~d^-1/2, so the higher powers start small (~d^-i/2) and the coefficients have to grow to
make them matter.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers.sharding import with_logical_axes

FEATURE_MAPS = ("identity", "polynomial")


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
    """ATLAS's learnable polynomial feature map of degree p (module docstring).

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
