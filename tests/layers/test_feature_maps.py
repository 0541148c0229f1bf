"""ATLAS's polynomial feature map (`layers.feature_maps`): identity at degree 1, the 1/i!
initialisation, the formula against a hand-written sum, gradients to the coefficients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.feature_maps import PolynomialFeatureMap, polynomial_features, taylor_coefficients

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
