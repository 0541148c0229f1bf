"""ATLAS's feature maps (`layers.feature_maps`). The element-wise "polynomial" map: identity
at degree 1, the 1/i! initialisation, the formula against a hand-written sum, gradients to
the coefficients. The monomial φ_p ("monomial"): against a NumPy loop over exponent vectors,
its kernel φ(q)·φ(k) against the closed form Σ s_i^2 (q·k)^i, its dimension, its init."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.feature_maps import (
    MonomialFeatureMap,
    PolynomialFeatureMap,
    make_feature_map,
    monomial_dim,
    monomial_features,
    polynomial_features,
    taylor_coefficients,
)

SHAPE = (2, 5, 3, 8)  # [B, T, H, D]


def _unit_vectors(seed=0):
    x = jax.random.normal(jax.random.key(seed), SHAPE, jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_degree_one_with_unit_coefficient_is_the_identity():
    feature_map = PolynomialFeatureMap(SHAPE[2], degree=1)
    np.testing.assert_array_equal(feature_map.coefficients[...], np.ones((SHAPE[2], 1)))
    x = _unit_vectors()
    np.testing.assert_array_equal(feature_map(x), x)  # exact: 1 * x
    large = 100.0 * x  # and not only for bounded inputs
    np.testing.assert_array_equal(feature_map(large), large)


def test_initial_coefficients_are_taylor_coefficients_of_exp():
    feature_map = PolynomialFeatureMap(SHAPE[2], degree=4)
    expected = [1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24]
    np.testing.assert_allclose(feature_map.coefficients[...], [expected] * SHAPE[2], rtol=1e-7)
    np.testing.assert_allclose(taylor_coefficients(4), expected, rtol=1e-7)


def test_features_are_the_weighted_sum_of_elementwise_powers():
    coefficients = jnp.array([[1.0, -0.5, 2.0], [0.3, 0.0, 1.0], [0.0, 1.0, 0.0]])  # [H, p]
    x = _unit_vectors(seed=1)
    expected = np.zeros(SHAPE, np.float64)
    x64 = np.asarray(x, np.float64)
    for head in range(SHAPE[2]):
        for index in range(3):
            power = x64[:, :, head] ** (index + 1)
            expected[:, :, head] += float(coefficients[head, index]) * power
    # float32 sums of three terms of size <= 2: rounding ~1e-7.
    np.testing.assert_allclose(polynomial_features(x, coefficients), expected, atol=1e-6)
    # At init on unit vectors, the degree-i term is bounded by 1/i! elementwise.
    bound = sum(1.0 / math.factorial(i) for i in range(1, 4))
    initial = PolynomialFeatureMap(SHAPE[2], degree=3)(x)
    assert float(jnp.max(jnp.abs(initial))) <= bound


def test_bfloat16_inputs_keep_their_dtype():
    x = _unit_vectors().astype(jnp.bfloat16)
    assert PolynomialFeatureMap(SHAPE[2], degree=3)(x).dtype == jnp.bfloat16


def test_gradients_flow_to_every_coefficient():
    feature_map = PolynomialFeatureMap(SHAPE[2], degree=3)
    x = _unit_vectors(seed=2)
    target = _unit_vectors(seed=3)

    def loss(module):
        return jnp.sum((module(x) - target) ** 2)

    grads = nnx.grad(loss)(feature_map)
    coefficient_grads = grads["coefficients"].get_value()
    assert coefficient_grads.shape == (SHAPE[2], 3)
    assert bool(jnp.all(jnp.isfinite(coefficient_grads)))
    assert bool(jnp.all(jnp.abs(coefficient_grads) > 0))
    # d loss / d a_{h,i} = sum 2 (φ(x) - target) x^i over the head's entries.
    residual = feature_map(x) - target
    expected = jnp.stack(
        [jnp.sum(2 * residual * x ** (i + 1), axis=(0, 1, 3)) for i in range(3)], axis=-1
    )
    np.testing.assert_allclose(coefficient_grads, expected, rtol=1e-5, atol=1e-6)


def test_coefficients_carry_logical_axes():
    feature_map = PolynomialFeatureMap(SHAPE[2], degree=2)
    specs = nnx.get_partition_spec(nnx.state(feature_map, nnx.Param))
    assert tuple(specs["coefficients"].get_value()) == ("heads", None)


# ---- the monomial map φ_p(x) = [x^β]_{|β| <= p} --------------------------------------------


def _oracle_monomials(x, scales):
    """φ(x) by exponent vectors: for each degree i and each multiset of indices j1 <= ... <= ji
    (lexicographic), s_i sqrt(i! / Π m_j!) Π_j x_j^{m_j}, in float64, one vector at a time."""
    x = np.asarray(x, np.float64)
    *lead, heads, dim = x.shape
    rows = []
    for vector_index in np.ndindex(*lead, heads):
        head = vector_index[-1]
        vector = x[vector_index]
        features = []
        for degree in range(1, scales.shape[-1] + 1):
            for combination in itertools.combinations_with_replacement(range(dim), degree):
                exponents = np.bincount(combination, minlength=dim)
                count = math.factorial(degree) / np.prod([math.factorial(m) for m in exponents])
                monomial = np.prod(vector**exponents)
                features.append(float(scales[head, degree - 1]) * math.sqrt(count) * monomial)
        rows.append(features)
    return np.asarray(rows).reshape(*lead, heads, -1)


def test_monomial_features_match_the_numpy_oracle():
    x = _unit_vectors(seed=4)[:, :2, :, :4]  # [2, 2, 3, 4]: every monomial of 4 variables
    scales = jnp.array([[1.0, -0.5, 2.0], [0.3, 1.5, 1.0], [0.7, 0.0, -1.2]])  # [H, p = 3]
    ours = monomial_features(x, scales)
    assert ours.shape == (2, 2, 3, 4 + 10 + 20) and monomial_dim(4, 3) == 34
    np.testing.assert_allclose(ours, _oracle_monomials(x, np.asarray(scales)), atol=1e-6)
    np.testing.assert_array_equal(ours[..., :4], scales[:, 0, None] * x)  # the degree-1 block


def test_monomial_kernel_is_the_weighted_sum_of_dot_product_powers():
    """φ(q)·φ(k) = Σ_i s_i^2 (q·k)^i, computed from q·k alone (not from any monomial)."""
    q, k = _unit_vectors(seed=5), _unit_vectors(seed=6)  # d = 8
    scales = jnp.array([[1.0, 0.8, -0.6], [0.5, 1.0, 0.4], [2.0, 0.1, 1.0]])
    kernel = jnp.sum(monomial_features(q, scales) * monomial_features(k, scales), axis=-1)
    dot = np.sum(np.asarray(q, np.float64) * np.asarray(k, np.float64), axis=-1)
    s2 = np.asarray(scales, np.float64) ** 2
    expected = sum(s2[:, i] * dot ** (i + 1) for i in range(3))
    np.testing.assert_allclose(kernel, expected, atol=2e-6)
    # At init s_i = 1/sqrt(i!): the kernel is exp(q·k) - 1 truncated at degree p.
    feature_map = MonomialFeatureMap(SHAPE[2], degree=3)
    np.testing.assert_allclose(
        feature_map.coefficients[...], [[1.0, 0.5**0.5, 6**-0.5]] * SHAPE[2], rtol=1e-6
    )
    kernel = jnp.sum(feature_map(q) * feature_map(k), axis=-1)
    np.testing.assert_allclose(kernel, dot + dot**2 / 2 + dot**3 / 6, atol=2e-6)


def test_monomial_dimension_degree_one_gradients_and_dtype():
    assert [monomial_dim(16, p) for p in (1, 2, 3)] == [16, 16 + 136, 16 + 136 + 816]
    x = _unit_vectors(seed=7)
    np.testing.assert_array_equal(MonomialFeatureMap(SHAPE[2], degree=1)(x), x)
    feature_map = MonomialFeatureMap(SHAPE[2], degree=2)
    target = jax.random.normal(jax.random.key(8), SHAPE[:3] + (monomial_dim(8, 2),))

    def loss(module, inputs):
        return jnp.sum((module(inputs) - target) ** 2)

    grads, x_grad = nnx.grad(loss, argnums=(0, 1))(feature_map, x.at[0, 0, 0, :3].set(0.0))
    coefficient_grads = grads["coefficients"].get_value()
    assert bool(jnp.all(jnp.isfinite(x_grad))) and bool(jnp.all(coefficient_grads != 0))
    assert feature_map(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_make_feature_map_names_the_option_on_bad_input():
    assert make_feature_map("identity", 3, 2) is None
    assert isinstance(make_feature_map("monomial", 3, 2), MonomialFeatureMap)
    assert isinstance(make_feature_map("polynomial", 3, 2), PolynomialFeatureMap)
    for name in ("monomial", "polynomial"):
        for degree in (0, 1.5, True):
            with pytest.raises(ValueError, match=f"{name} feature map.*degree"):
                make_feature_map(name, 3, degree)
    with pytest.raises(ValueError, match="feature_map='tensor'"):
        make_feature_map("tensor", 3, 2)
