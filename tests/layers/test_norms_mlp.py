"""RMSNorm and SwiGLU against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.mlp import SwiGLU, swiglu_hidden_dim
from layers.norms import RMSNorm


def test_rms_norm_formula_and_dtype():
    x = jax.random.normal(jax.random.key(0), (3, 5, 8)) * 3.0
    norm = RMSNorm(8, eps=1e-6, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.arange(1.0, 9.0)
    x64 = np.asarray(x, np.float64)
    expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * np.arange(1.0, 9.0)
    np.testing.assert_allclose(norm(x), expected, rtol=1e-5, atol=1e-5)
    half = RMSNorm(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16


def test_swiglu_formula():
    mlp = SwiGLU(8, 32, init_std=0.5, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (2, 3, 8))
    gate, up, down = (np.asarray(m.kernel[...], np.float64) for m in (mlp.gate, mlp.up, mlp.down))
    x64 = np.asarray(x, np.float64)
    pre = x64 @ gate
    expected = (pre / (1 + np.exp(-pre)) * (x64 @ up)) @ down
    np.testing.assert_allclose(mlp(x), expected, rtol=1e-5, atol=1e-5)


def test_swiglu_default_width():
    assert swiglu_hidden_dim(128) == 352  # 8/3 * 128 = 341.3 -> nearest multiple of 32
    assert swiglu_hidden_dim(768) == 2048
    assert swiglu_hidden_dim(8) == 32
