"""Linear attention with its normaliser (`normalized_recurrence`) held to a float64 NumPy loop
written from Katharopoulos et al. (2020): S_t = exp(g_t) S_{t-1} + φ(k_t) v_t^T,
z_t = exp(g_t) z_{t-1} + φ(k_t), o_t = S_t^T φ(q_t) / (z_t^T φ(q_t) + eps), with φ = elu + 1,
the state and z reset at segment starts; and chunked against the reference, gradients
included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_memory
from pallas_kernels.linear_memory.api import NORMALIZER_EPS
from tests.pallas_kernels.test_linear_memory import F32_TOL, assert_close, packed_segment_ids

BATCH, HEADS, KEY_DIM, VALUE_DIM = 2, 2, 8, 16


def elu_plus_one(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def make_inputs(seed, length):
    rng = np.random.default_rng(seed)
    shape = (BATCH, length, HEADS)
    return dict(
        q=elu_plus_one(rng.standard_normal(shape + (KEY_DIM,))),
        k=elu_plus_one(rng.standard_normal(shape + (KEY_DIM,))),
        v=rng.standard_normal(shape + (VALUE_DIM,)),
        g=-np.logaddexp(0.0, rng.standard_normal(shape)),
        # S_0 and z_0 (z_0 > 0, as a sum of positive features is).
        initial_state=np.concatenate(
            [
                0.5 * rng.standard_normal((BATCH, HEADS, KEY_DIM, VALUE_DIM)),
                rng.uniform(0.5, 2.0, (BATCH, HEADS, KEY_DIM, 1)),
            ],
            axis=-1,
        ),
    )


def numpy_oracle(q, k, v, g, initial_state, segment_ids):
    """Token by token in float64: S [Dk, Dv] and z [Dk] per (batch, head)."""
    batch, length, heads, _ = q.shape
    o = np.zeros(v.shape)
    for b in range(batch):
        for h in range(heads):
            state = initial_state[b, h, :, :-1].copy()
            z = initial_state[b, h, :, -1].copy()
            for t in range(length):
                if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    state, z = np.zeros_like(state), np.zeros_like(z)  # a new document
                decay = np.exp(g[b, t, h])
                state = decay * state + np.outer(k[b, t, h], v[b, t, h])
                z = decay * z + k[b, t, h]
                o[b, t, h] = state.T @ q[b, t, h] / (z @ q[b, t, h] + NORMALIZER_EPS)
    return o


def run(rule, inputs, **options):
    as_f32 = {name: jnp.asarray(x, jnp.float32) for name, x in inputs.items()}
    g = as_f32["g"] if rule == "gla" else None
    return linear_memory.normalized_recurrence(
        rule,
        as_f32["q"],
        as_f32["k"],
        as_f32["v"],
        g,
        initial_state=as_f32["initial_state"],
        output_final_state=True,
        **options,
    )


@pytest.mark.parametrize("rule", ["linear_attention", "gla"])
@pytest.mark.parametrize("impl,chunk_size", [("reference", 16), ("chunked", 4), ("chunked", 16)])
def test_matches_the_written_out_loop(rule, impl, chunk_size):
    length = 23
    inputs = make_inputs(seed=1, length=length)
    if rule == "linear_attention":
        inputs["g"] = np.zeros_like(inputs["g"])
    segment_ids = np.asarray(packed_segment_ids(length))
    expected = numpy_oracle(**inputs, segment_ids=segment_ids)
    o, final_state = run(
        rule, inputs, segment_ids=jnp.asarray(segment_ids), impl=impl, chunk_size=chunk_size
    )
    assert final_state.shape == (BATCH, HEADS, KEY_DIM, VALUE_DIM + 1)
    assert_close(o, expected, F32_TOL, "o")
    # Without the normaliser the outputs are far off: the check can fail.
    unnormalized, _ = linear_memory.recurrence(
        rule,
        *(jnp.asarray(inputs[name], jnp.float32) for name in ("q", "k", "v", "g")),
        scale=1.0,
        initial_state=jnp.asarray(inputs["initial_state"][..., :-1], jnp.float32),
        segment_ids=jnp.asarray(segment_ids),
    )
    assert np.max(np.abs(np.asarray(unnormalized) - expected)) > 100 * F32_TOL


def test_chunked_gradients_match_reference():
    length = 37
    inputs = make_inputs(seed=2, length=length)
    segment_ids = packed_segment_ids(length)
    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal(inputs["v"].shape))
    names = ("q", "k", "v", "g", "initial_state")

    def gradients(impl):
        def loss(differentiable):
            o, final_state = run("gla", {**inputs, **differentiable}, impl=impl, chunk_size=16,
                                 segment_ids=segment_ids)  # fmt: skip
            return jnp.sum(o * cotangent) + jnp.sum(final_state)

        start = {name: jnp.asarray(inputs[name], jnp.float32) for name in names}
        return jax.jit(jax.grad(loss))(start)

    expected, actual = gradients("reference"), gradients("chunked")
    for name in names:
        assert_close(actual[name], expected[name], F32_TOL, f"d{name}")


def test_delta_rules_are_refused():
    inputs = {name: jnp.ones((1, 4, 1, 8)) for name in ("q", "k", "v")}
    with pytest.raises(ValueError, match="additive rules"):
        linear_memory.normalized_recurrence("deltanet", **inputs)
