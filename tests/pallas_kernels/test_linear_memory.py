"""Chunked matrix-memory recurrences held to the token-by-token reference.

Covers outputs, final states and the gradient of every input (q, k, v, g, beta,
initial_state) for linear attention, simple GLA, DeltaNet and Gated DeltaNet, with packed
segments, lengths that are / are not multiples of the chunk size, one and several chunks,
float32 and bfloat16 inputs. The reference itself is checked against a numpy loop written
straight from the update equation.

No matmul-precision override: on CPU float32 matmuls are computed in full float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_memory
from pallas_kernels.linear_memory import chunked

# Tolerances, fixed once: max |actual - expected| <= TOL * max(1, max |expected|), per array.
# float32: chunked and reference differ only by summation order (observed <= 5e-7).
F32_TOL = 1e-5
# bfloat16 inputs: both sides see the same bf16-rounded inputs and compute in float32, so
# the difference is the final rounding of o / the gradients to bf16 (half an ulp: up to
# 2^-8 relative, observed 3.4e-3) plus float32 noise.
BF16_TOL = 1e-2

BATCH, HEADS, KEY_DIM, VALUE_DIM = 2, 2, 8, 16
CHUNK = 16

# name -> (public function, takes g, takes beta)
RULES = {
    "linear_attention": (linear_memory.linear_attention, False, False),
    "simple_gla": (linear_memory.simple_gla, True, False),
    "delta_rule": (linear_memory.delta_rule, False, True),
    "gated_delta_rule": (linear_memory.gated_delta_rule, True, True),
}


def make_inputs(seed, length, dtype=jnp.float32, key_dim=KEY_DIM, value_dim=VALUE_DIM):
    """Inputs shaped like the layers feed them: unit-norm q/k, β = sigmoid, g = -softplus.

    Drawn with numpy: jax.random would compile its kernels again for every new shape.
    """
    rng = np.random.default_rng(seed)
    shape = (BATCH, length, HEADS)

    def unit(dim):
        x = rng.standard_normal(shape + (dim,))
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    g = -np.logaddexp(0.0, 2.0 * rng.standard_normal(shape))  # -softplus
    # Some strongly negative decays (near-complete forgetting), as real gates produce.
    g = np.where(rng.uniform(size=shape) < 0.1, -12.0, g)
    inputs = dict(
        q=unit(key_dim),
        k=unit(key_dim),
        v=rng.standard_normal(shape + (value_dim,)),
        g=g,
        beta=1.0 / (1.0 + np.exp(-rng.standard_normal(shape))),
    )
    inputs = {name: jnp.asarray(x, jnp.float32).astype(dtype) for name, x in inputs.items()}
    initial_state = 0.5 * rng.standard_normal((BATCH, HEADS, key_dim, value_dim))
    inputs["initial_state"] = jnp.asarray(initial_state, jnp.float32)
    return inputs


def packed_segment_ids(length):
    """Row 0: three segments with boundaries inside chunks; row 1: a boundary on the chunk
    edge when length > 2 * CHUNK, and a returning id (ids 0, 1, 0 are three segments: only
    changes matter)."""
    row0 = np.zeros(length, np.int32)
    row0[length // 3 :] = 1
    row0[length - 5 :] = 2
    row1 = np.zeros(length, np.int32)
    row1[min(CHUNK, length // 2) :] = 1
    row1[length - 2 :] = 0
    return jnp.asarray(np.stack([row0, row1]))


def call(rule, inputs, **kwargs):
    fn, takes_g, takes_beta = RULES[rule]
    gates = ([inputs["g"]] if takes_g else []) + ([inputs["beta"]] if takes_beta else [])
    return fn(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        *gates,
        initial_state=inputs["initial_state"],
        output_final_state=True,
        **kwargs,
    )


def differentiable_names(rule):
    _, takes_g, takes_beta = RULES[rule]
    return ["q", "k", "v"] + ["g"] * takes_g + ["beta"] * takes_beta + ["initial_state"]


def outputs_and_gradients(rule, inputs, seed=123, **kwargs):
    """(o, final_state, {name: gradient}) for a random linear function of both outputs.

    One jit of value-and-grad (rather than an eager vjp) keeps compile time down.
    """
    names = differentiable_names(rule)
    # Cotangent values exactly representable in bfloat16, so a bf16 run and its float32
    # oracle are differentiated along the very same direction.
    rng = np.random.default_rng(seed)
    cotangent_o, cotangent_state = (
        jnp.asarray(rng.standard_normal(shape), jnp.bfloat16).astype(jnp.float32)
        for shape in (inputs["v"].shape, inputs["initial_state"].shape)
    )

    def loss(differentiable):
        o, final_state = call(rule, {**inputs, **differentiable}, **kwargs)
        value = jnp.sum(o.astype(jnp.float32) * cotangent_o)
        return value + jnp.sum(final_state * cotangent_state), (o, final_state)

    grads, (o, final_state) = jax.jit(jax.grad(loss, has_aux=True))(
        {name: inputs[name] for name in names}
    )
    return o, final_state, grads


def assert_close(actual, expected, tol, what):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, what
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    error = np.max(np.abs(actual - expected))
    bound = tol * max(1.0, float(np.max(np.abs(expected))))
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


# (length, segments) with chunks of 16: one padded chunk; several chunks with padding; an
# exact multiple (4 chunks) without segments. Kept to three: each compiles two gradients.
CASES = [(13, True), (37, True), (64, False)]


@pytest.mark.parametrize("length,segments", CASES)
@pytest.mark.parametrize("rule", list(RULES))
def test_chunked_matches_reference_float32(rule, length, segments):
    inputs = make_inputs(seed=length, length=length)
    segment_ids = packed_segment_ids(length) if segments else None
    expected = outputs_and_gradients(rule, inputs, segment_ids=segment_ids, impl="reference")
    actual = outputs_and_gradients(
        rule, inputs, segment_ids=segment_ids, impl="chunked", chunk_size=CHUNK
    )
    assert actual[0].dtype == jnp.float32 and actual[1].dtype == jnp.float32
    assert_close(actual[0], expected[0], F32_TOL, "o")
    assert_close(actual[1], expected[1], F32_TOL, "final_state")
    for name in differentiable_names(rule):
        assert_close(actual[2][name], expected[2][name], F32_TOL, f"d{name}")


# The dtype handling is shared by all rules; one additive and one delta rule cover it.
@pytest.mark.parametrize("rule", ["simple_gla", "gated_delta_rule"])
def test_chunked_bfloat16_matches_float32_reference(rule):
    length = 37
    inputs = make_inputs(seed=7, length=length, dtype=jnp.bfloat16)
    # The float32 oracle sees exactly the bf16-rounded values.
    inputs_f32 = {name: x.astype(jnp.float32) for name, x in inputs.items()}
    segment_ids = packed_segment_ids(length)
    expected = outputs_and_gradients(rule, inputs_f32, segment_ids=segment_ids, impl="reference")
    actual = outputs_and_gradients(
        rule, inputs, segment_ids=segment_ids, impl="chunked", chunk_size=CHUNK
    )
    assert actual[0].dtype == jnp.bfloat16 and actual[1].dtype == jnp.float32
    assert_close(actual[0], expected[0], BF16_TOL, "o")
    assert_close(actual[1], expected[1], BF16_TOL, "final_state")
    for name in differentiable_names(rule):
        assert_close(actual[2][name], expected[2][name], BF16_TOL, f"d{name}")


def test_strong_decays_over_a_long_chunk():
    """Log decays down to -40 per token over a 64-token chunk (cumulative ~ -1300): nothing
    overflows or turns NaN, and the pairwise decays keep float32 accuracy."""
    inputs = make_inputs(seed=9, length=64)
    inputs["g"] = jnp.asarray(-np.random.default_rng(9).uniform(0, 40, inputs["g"].shape))
    inputs["g"] = inputs["g"].astype(jnp.float32)
    expected = outputs_and_gradients("gated_delta_rule", inputs, impl="reference")
    actual = outputs_and_gradients("gated_delta_rule", inputs, impl="chunked", chunk_size=64)
    assert_close(actual[0], expected[0], F32_TOL, "o")
    assert_close(actual[1], expected[1], F32_TOL, "final_state")
    for name in differentiable_names("gated_delta_rule"):
        assert_close(actual[2][name], expected[2][name], F32_TOL, f"d{name}")


# linear_attention / delta_rule run the same chunked code with g = 0.
@pytest.mark.parametrize("rule", ["simple_gla", "gated_delta_rule"])
def test_chunk_size_does_not_change_results(rule):
    length = 45
    inputs = make_inputs(seed=3, length=length)
    segment_ids = packed_segment_ids(length)
    results = [
        call(rule, inputs, segment_ids=segment_ids, impl="chunked", chunk_size=chunk_size)
        for chunk_size in (1, 7, 64)
    ]
    for chunk_size, (o, final_state) in zip((1, 7), results[:-1]):
        assert_close(o, results[-1][0], F32_TOL, f"o, chunk {chunk_size} vs 64")
        assert_close(final_state, results[-1][1], F32_TOL, f"state, chunk {chunk_size} vs 64")


def test_triangular_inverse_has_the_gradient_of_its_blocking():
    """The written-out VJP of (I + A)^{-1} equals autodiff through the blocked inverse
    (37 x 37: padded to 64 inside), upper entries and diagonal of A getting none."""
    rng = np.random.default_rng(3)
    strictly_lower = jnp.asarray(np.tril(0.3 * rng.standard_normal((3, 37, 37)), -1), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((3, 37, 37)), jnp.float32)
    full = strictly_lower + jnp.asarray(np.triu(rng.standard_normal((37, 37))), jnp.float32)

    def gradient(inverse, a):
        return jax.grad(lambda a: jnp.sum(inverse(a) * cotangent))(a)

    written = gradient(chunked.unit_lower_inverse, full)
    differentiated = gradient(chunked.unit_lower_inverse.fun, full)
    assert_close(written, differentiated, F32_TOL, "dA")
    assert not np.any(np.triu(np.asarray(written)))


@pytest.mark.parametrize("chunks_per_step", [None, 3])
def test_chunks_per_scan_step_do_not_change_results(chunks_per_step):
    """All chunks at once (accelerators' default) and 3 per step (5 chunks: the last step
    padded) give the reference's outputs and gradients, as 1 per step (CPU's) does above."""
    length, rule = 37, "gated_delta_rule"
    inputs = make_inputs(seed=5, length=length)
    segment_ids = packed_segment_ids(length)
    expected = call(rule, inputs, segment_ids=segment_ids, impl="reference")
    names = differentiable_names(rule)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(inputs["v"].shape))

    def loss(differentiable):
        x = {**inputs, **differentiable}
        o, final_state = chunked.recurrence(
            x["q"], x["k"], x["v"], x["g"], x["beta"], scale=KEY_DIM**-0.5,
            initial_state=x["initial_state"], segment_ids=segment_ids, chunk_size=8,
            chunks_per_step=chunks_per_step,
        )  # fmt: skip
        return jnp.sum(o * cotangent), (o, final_state)

    grads, (o, final_state) = jax.jit(jax.grad(loss, has_aux=True))({n: inputs[n] for n in names})
    assert_close(o, expected[0], F32_TOL, "o")
    assert_close(final_state, expected[1], F32_TOL, "final_state")

    def reference_loss(differentiable):
        o, _ = call(rule, {**inputs, **differentiable}, segment_ids=segment_ids, impl="reference")
        return jnp.sum(o * cotangent)

    reference_grads = jax.grad(reference_loss)({n: inputs[n] for n in names})
    for name in names:
        assert_close(grads[name], reference_grads[name], F32_TOL, f"d{name}")


def test_packed_segments_equal_separate_sequences():
    """A reset starts the new segment from a zero state, whatever initial_state was."""
    rule = "gated_delta_rule"
    length, boundary = 40, 23
    inputs = make_inputs(seed=11, length=length)
    segment_ids = jnp.asarray(np.repeat([[0] * boundary + [1] * (length - boundary)], BATCH, 0))
    o, final_state = call(rule, inputs, segment_ids=segment_ids, chunk_size=CHUNK)

    def piece(start, stop, initial_state):
        sliced = {n: x[:, start:stop] for n, x in inputs.items() if n != "initial_state"}
        return call(rule, {**sliced, "initial_state": initial_state}, chunk_size=CHUNK)

    o_first, _ = piece(0, boundary, inputs["initial_state"])
    o_second, state_second = piece(boundary, length, jnp.zeros_like(inputs["initial_state"]))
    assert_close(o[:, :boundary], o_first, F32_TOL, "o of the first segment")
    assert_close(o[:, boundary:], o_second, F32_TOL, "o of the second segment")
    assert_close(final_state, state_second, F32_TOL, "final_state")


def numpy_recurrence(q, k, v, g, beta, initial_state, segment_ids, scale):
    """Straight from the equations, in float64. g = None: no decay; beta = None: additive.

    S_t = a_t S_{t-1} + β_t k_t (v_t - a_t S_{t-1}^T k_t)^T  or  a_t S_{t-1} + k_t v_t^T,
    a_t = exp(g_t), S_{t-1} = 0 where the segment id changes, o_t = scale S_t^T q_t.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    o = np.zeros(v.shape)
    states = np.array(initial_state, np.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            S = states[b, h]
            for t in range(q.shape[1]):
                if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    S = np.zeros_like(S)
                a = 1.0 if g is None else np.exp(float(g[b, t, h]))
                kt, vt = k[b, t, h], v[b, t, h]
                if beta is None:
                    S = a * S + np.outer(kt, vt)
                else:
                    S = a * S + float(beta[b, t, h]) * np.outer(kt, vt - a * S.T @ kt)
                o[b, t, h] = scale * S.T @ q[b, t, h]
            states[b, h] = S
    return o, states


@pytest.mark.parametrize("rule", list(RULES))
def test_reference_matches_numpy_loop(rule):
    """Guards the oracle itself with an independent float64 loop."""
    length, scale = 21, 0.7
    inputs = make_inputs(seed=5, length=length)
    segment_ids = packed_segment_ids(length)
    _, takes_g, takes_beta = RULES[rule]
    expected = numpy_recurrence(
        **{
            **inputs,
            "g": inputs["g"] if takes_g else None,
            "beta": inputs["beta"] if takes_beta else None,
        },
        segment_ids=np.asarray(segment_ids),
        scale=scale,
    )
    actual = call(rule, inputs, scale=scale, segment_ids=segment_ids, impl="reference")
    assert_close(actual[0], expected[0], F32_TOL, "o")
    assert_close(actual[1], expected[1], F32_TOL, "final_state")


def test_defaults_scale_and_final_state():
    inputs = make_inputs(seed=2, length=10)
    q, k, v, g, beta = (inputs[n] for n in ("q", "k", "v", "g", "beta"))
    o, final_state = linear_memory.gated_delta_rule(q, k, v, g, beta)
    assert final_state is None and o.shape == v.shape and o.dtype == v.dtype
    explicit, _ = linear_memory.gated_delta_rule(q, k, v, g, beta, scale=KEY_DIM**-0.5)
    np.testing.assert_array_equal(o, explicit)


def good_args(length=10):
    inputs = make_inputs(seed=1, length=length)
    return dict(
        q=inputs["q"],
        k=inputs["k"],
        v=inputs["v"],
        g=inputs["g"],
        beta=inputs["beta"],
        initial_state=inputs["initial_state"],
        segment_ids=jnp.zeros((BATCH, length), jnp.int32),
    )


@pytest.mark.parametrize(
    "name,bad_value,message",
    [
        ("q", jnp.zeros((BATCH, 10, HEADS)), "q has shape"),
        ("k", jnp.zeros((BATCH, 10, HEADS, KEY_DIM + 1)), "k has shape"),
        ("v", jnp.zeros((BATCH, 11, HEADS, VALUE_DIM)), "v has shape"),
        ("g", jnp.zeros((BATCH, 10)), "g has shape"),
        ("beta", jnp.zeros((BATCH, 10, HEADS + 1)), "beta has shape"),
        ("beta", None, "beta is None"),
        ("initial_state", jnp.zeros((BATCH, HEADS, VALUE_DIM, KEY_DIM)), "initial_state has"),
        ("segment_ids", jnp.zeros((BATCH, 9), jnp.int32), "segment_ids has shape"),
        ("segment_ids", jnp.zeros((BATCH, 10)), "segment_ids has dtype"),
        ("chunk_size", 0, "chunk_size"),
        ("impl", "triton", "impl='triton' is not one of"),
    ],
)
def test_bad_arguments_raise_value_error(name, bad_value, message):
    args = {**good_args(), name: bad_value}
    positional = [args.pop(n) for n in ("q", "k", "v", "g", "beta")]
    with pytest.raises(ValueError, match=message):
        linear_memory.gated_delta_rule(*positional, **args)
