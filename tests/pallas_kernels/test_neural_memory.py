"""Deep-memory recurrence: chunked form vs the token-by-token references, the gated delta
rule, gradients, the public API and numerical health on a long sequence.

Inputs follow a default-like regime (unit-norm q/k, theta = 0.05 sigmoid(.), g = -softplus(. -
4) ~ -0.02, eta = sigmoid(.), weights ~ N(0, 1/d_in)). The parameter-free LN of the MLP memory
scales its gradients by 1/|z_L|, so strong decay or large steps make the exact rule chaotic;
in this regime float32 rounding stays well below the tolerances below, and the float64 runs
check the algebra itself to near machine precision.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.neural_memory import (
    MemoryInputs,
    MemorySpec,
    NeuralMemoryState,
    choices,
    chunked,
    init_state,
    neural_memory,
    reference,
    state_norms,
    step,
)

BATCH, HEADS, DIM = 2, 2, 8
# float32: chunked vs reference differ only by rounding (different summation order),
# amplified a little by the recurrence; 1e-5 relative to the largest value (~1-5).
F32_TOL = 1e-5
# float64: the same comparisons check the algebra; any formula error shows as >1e-6.
F64_TOL = 1e-10
# Gradients pass through the LN / recurrence Jacobians once more: 1e-4 relative to the
# largest entry of each gradient in float32.
GRAD_TOL = 1e-4

# Every call below is jitted: one XLA compile per case instead of many small eager ones.
jit_neural_memory = jax.jit(
    neural_memory, static_argnames=("memory", "chunk_size", "output_final_state", "impl")
)
jit_step = jax.jit(step, static_argnums=0)

SPECS = [
    MemorySpec(architecture=arch, bias=bias, rule=rule)
    for arch in ("matrix", "mlp")
    for bias in ("l2", "dot_product")
    for rule in ("gd", "momentum")
]


def spec_id(spec):
    return f"{spec.architecture}-{spec.bias}-{spec.rule}"


def make_inputs(spec, seq_len, seed=0, dtype=jnp.float32, dim=DIM, batch=BATCH):
    """(MemoryInputs, state) in the default-like regime described above."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    shape = (batch, seq_len, HEADS)
    q, k, v = unit(normal(*shape, dim)), unit(normal(*shape, dim)), normal(*shape, dim)
    lr = 0.05 * jax.nn.sigmoid(normal(*shape))
    momentum = jax.nn.sigmoid(normal(*shape)) if spec.learning_rule.uses_momentum else None
    log_decay = -jax.nn.softplus(normal(*shape) - 4.0)
    shapes = spec.weight_shapes(dim, dim)
    weights = {n: normal(batch, HEADS, *s) / np.sqrt(s[0]) for n, s in shapes.items()}
    state_momentum = None
    if spec.learning_rule.uses_momentum:  # a nonzero carried momentum exercises D_t
        state_momentum = {n: 0.1 * normal(batch, HEADS, *s) for n, s in shapes.items()}
    inputs = MemoryInputs(q, k, v, lr, momentum, log_decay)
    return inputs, NeuralMemoryState(weights, state_momentum)


def max_relative_error(actual, expected):
    """max |a - e| over every leaf, relative to the largest |e| (at least 1)."""
    errors, scales = [], []
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        errors.append(np.max(np.abs(a - e)))
        scales.append(np.max(np.abs(e)))
    return max(errors) / max(1.0, max(scales))


# ------------------------------------------------------------------ chunked vs references


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_chunk_size_one_is_the_exact_rule(spec):
    args = make_inputs(spec, seq_len=27)
    expected = jax.jit(lambda *a: reference.exact_scan(spec, *a))(*args)
    actual = jax.jit(lambda *a: chunked.chunked_scan(spec, *a, chunk_size=1))(*args)
    assert max_relative_error(actual, expected) < F32_TOL


CHUNK_CASES = [(spec, 4, 30) for spec in SPECS] + [
    (MemorySpec(architecture="mlp", bias="l2", rule="momentum"), 8, 27),
    (MemorySpec(architecture="matrix", bias="l2", rule="momentum"), 8, 27),
    (MemorySpec(architecture="mlp", bias="dot_product", rule="gd"), 8, 3),  # one partial chunk
]


@pytest.mark.parametrize(
    "spec, chunk_size, seq_len",
    CHUNK_CASES,
    ids=[f"{spec_id(s)}-b{b}-T{t}" for s, b, t in CHUNK_CASES],
)
def test_chunked_matches_chunk_start_scan(spec, chunk_size, seq_len):
    args = make_inputs(spec, seq_len, seed=1)
    expected = jax.jit(lambda *a: reference.chunk_start_scan(spec, *a, chunk_size))(*args)
    actual = jax.jit(lambda *a: chunked.chunked_scan(spec, *a, chunk_size=chunk_size))(*args)
    assert max_relative_error(actual, expected) < F32_TOL


@pytest.mark.parametrize(
    "spec",
    [MemorySpec(architecture="mlp", rule="momentum"), MemorySpec(architecture="matrix", rule="gd")],
    ids=spec_id,
)
def test_algebra_in_float64(spec):
    with jax.enable_x64(True):
        args = make_inputs(spec, seq_len=23, seed=2, dtype=jnp.float64)
        exact = reference.exact_scan(spec, *args)
        chunk_start_one = reference.chunk_start_scan(spec, *args, chunk_size=1)
        assert max_relative_error(chunked.chunked_scan(spec, *args, chunk_size=1), exact) < F64_TOL
        assert max_relative_error(chunk_start_one, exact) < F64_TOL
        for chunk_size in (5,):  # 23 tokens: four whole chunks and a partial one
            expected = reference.chunk_start_scan(spec, *args, chunk_size)
            actual = chunked.chunked_scan(spec, *args, chunk_size=chunk_size)
            assert max_relative_error(actual, expected) < F64_TOL


def test_chunking_changes_the_mlp_rule():
    """Guards the tests above against comparing two things that cannot differ."""
    spec = MemorySpec(architecture="mlp", rule="momentum")
    args = make_inputs(spec, seq_len=16, seed=3)
    exact = reference.exact_scan(spec, *args)
    chunked_rule = reference.chunk_start_scan(spec, *args, chunk_size=8)
    assert max_relative_error(chunked_rule, exact) > 1e-3


# ------------------------------------------------------------ closed-form matrix memories


def gated_delta_rule_numpy(q, k, v, beta, log_decay, initial):
    """S_t = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T, o_t = S_t^T q_t, a_t = exp(g_t)."""
    q, k, v, beta, log_decay = (np.asarray(x, np.float64) for x in (q, k, v, beta, log_decay))
    state = np.array(initial, np.float64)  # [B, H, Dk, Dv]
    outputs = np.zeros(v.shape)
    for t in range(q.shape[1]):
        decay = np.exp(log_decay[:, t])[..., None, None]
        retained = decay * state
        error = v[:, t] - np.einsum("bhkv,bhk->bhv", retained, k[:, t])
        state = retained + beta[:, t, :, None, None] * np.einsum("bhk,bhv->bhkv", k[:, t], error)
        outputs[:, t] = np.einsum("bhkv,bhk->bhv", state, q[:, t])
    return outputs, state


def gated_linear_attention_numpy(q, k, v, lr, log_decay, initial):
    """S_t = a_t S_{t-1} + theta_t k_t v_t^T, o_t = S_t^T q_t (dot-product bias, GD)."""
    q, k, v, lr, log_decay = (np.asarray(x, np.float64) for x in (q, k, v, lr, log_decay))
    state = np.array(initial, np.float64)
    outputs = np.zeros(v.shape)
    for t in range(q.shape[1]):
        state = np.exp(log_decay[:, t])[..., None, None] * state + lr[:, t, :, None, None] * (
            np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        )
        outputs[:, t] = np.einsum("bhkv,bhk->bhv", state, q[:, t])
    return outputs, state


@pytest.mark.parametrize(
    "bias, closed_form",
    [("l2", gated_delta_rule_numpy), ("dot_product", gated_linear_attention_numpy)],
)
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_matrix_gd_is_a_closed_form_rule(bias, closed_form, impl):
    spec = MemorySpec(architecture="matrix", bias=bias, rule="gd")
    inputs, state = make_inputs(spec, seq_len=25, seed=4)
    inputs = inputs.replace(lr=4.0 * inputs.lr)  # beta up to 0.2, still a contraction for unit keys
    output, final = jit_neural_memory(
        inputs, memory=spec, initial_state=state, chunk_size=1, output_final_state=True, impl=impl
    )
    q, k, v, lr, log_decay = inputs.q, inputs.k, inputs.v, inputs.lr, inputs.log_decay
    expected_output, expected_state = closed_form(q, k, v, lr, log_decay, state.weights["W"])
    assert max_relative_error(output, expected_output) < F32_TOL
    assert max_relative_error(final.weights["W"], expected_state) < F32_TOL


# ---------------------------------------------------------------------------- gradients


def scalar_loss(run, spec, seed):
    """A random linear functional of outputs and final state, as a function of all inputs."""
    rng = np.random.default_rng(seed)

    def loss(inputs, initial_weights):
        state = init_state(spec, initial_weights, BATCH)
        output, final = run(inputs, state)
        leaves = [output] + jax.tree.leaves(final)
        probes = [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in leaves]
        return sum(jnp.sum(x * p) for x, p in zip(leaves, probes))

    return loss


GRADIENT_CASES = [
    (MemorySpec(architecture="mlp", bias="l2", rule="momentum"), 4),
    (MemorySpec(architecture="mlp", bias="dot_product", rule="gd", activation="silu"), 1),
    (MemorySpec(architecture="matrix", bias="l2", rule="momentum"), 4),
]


@pytest.mark.parametrize(
    "spec, chunk_size", GRADIENT_CASES, ids=[f"{spec_id(s)}-b{b}" for s, b in GRADIENT_CASES]
)
def test_gradients_match_reference(spec, chunk_size):
    inputs, state = make_inputs(spec, seq_len=10, seed=5)
    initial_weights = {name: leaf[0] for name, leaf in state.weights.items()}  # [H, ...]

    def expected_run(*a):
        return reference.chunk_start_scan(spec, *a, chunk_size)

    def actual_run(*a):
        return chunked.chunked_scan(spec, *a, chunk_size=chunk_size)

    grad = lambda run: jax.jit(jax.grad(scalar_loss(run, spec, 6), argnums=(0, 1)))  # noqa: E731
    expected = grad(expected_run)(inputs, initial_weights)
    actual = grad(actual_run)(inputs, initial_weights)
    # every input's gradient, and the initial weights'
    for e, a in zip([*expected[0].named().values(), expected[1]],
                    [*actual[0].named().values(), actual[1]], strict=True):  # fmt: skip
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(a))
        assert max_relative_error(a, e) < GRAD_TOL


# ---------------------------------------------------------------- pieces of the choices


@pytest.mark.parametrize("name", sorted(choices.ACTIVATIONS))
def test_activation_derivatives(name):
    activation = choices.ACTIVATIONS[name]
    x = jnp.linspace(-6.0, 6.0, 101)
    expected = jax.vmap(jax.grad(activation.fn))(x)
    np.testing.assert_allclose(activation.derivative(x), expected, atol=1e-6)


def test_layer_norm_vjp():
    rng = np.random.default_rng(7)
    z = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32) * 0.1
    cotangent = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    _, vjp = jax.vjp(lambda x: choices.layer_norm(x, 1e-6), z)
    np.testing.assert_allclose(choices.layer_norm_vjp(z, cotangent, 1e-6), vjp(cotangent)[0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_hand_backprop_matches_autodiff(depth):
    spec = MemorySpec(architecture="mlp", depth=depth, expansion=2, activation="silu")
    architecture = spec.memory_architecture
    rng = np.random.default_rng(8)
    weights = {
        n: jnp.asarray(rng.standard_normal((2, *s)) / np.sqrt(s[0]), jnp.float32)
        for n, s in spec.weight_shapes(DIM, DIM).items()
    }
    keys = jnp.asarray(rng.standard_normal((2, 5, DIM)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((2, 5, DIM)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.0, (2, 5, 1)), jnp.float32)

    @jax.jit
    def hand_and_autodiff(weights, keys, values, scale):
        prediction, cache = architecture.forward(weights, keys, scale)
        factors = architecture.backward(weights, cache, prediction - values, scale)
        expected = [
            reference.memory_gradient(
                spec,
                {n: scale[:, token, :, None] * w for n, w in weights.items()},
                keys[:, token],
                values[:, token],
            )
            for token in range(5)
        ]
        return factors, expected

    factors, expected_per_token = hand_and_autodiff(weights, keys, values, scale)
    for token, expected in enumerate(expected_per_token):
        for name, (inputs, deltas) in zip(architecture.layer_names, factors):
            outer = inputs[:, token, :, None] * deltas[:, token, None, :]
            assert max_relative_error(outer, expected[name]) < 1e-5


# --------------------------------------------------------------------------------- api


def test_step_by_step_decoding_equals_the_sequence():
    spec = MemorySpec(architecture="mlp", rule="momentum")
    inputs, state = make_inputs(spec, seq_len=6, seed=9)
    expected, expected_final = jit_neural_memory(
        inputs, memory=spec, initial_state=state, output_final_state=True, impl="reference"
    )
    outputs = []
    for t in range(6):
        output, state = jit_step(spec, state, inputs.map(lambda name, x, t=t: x[:, t]))
        outputs.append(output)
    assert max_relative_error(jnp.stack(outputs, axis=1), expected) < F32_TOL
    assert max_relative_error(state, expected_final) < F32_TOL


def test_api_defaults_dtypes_and_norms():
    spec = MemorySpec(architecture="mlp", rule="gd")
    inputs, state = make_inputs(spec, seq_len=10, seed=10)
    inputs = inputs.replace(log_decay=None)
    initial = {name: leaf[0] for name, leaf in state.weights.items()}
    state = init_state(spec, initial, BATCH)
    assert state.momentum is None and state.weights["W1"].shape == (BATCH, HEADS, DIM, 2 * DIM)
    no_decay, final = jit_neural_memory(inputs, memory=spec, initial_state=state,
                                        chunk_size=4, output_final_state=True)  # fmt: skip
    zero_decay, _ = jit_neural_memory(inputs.replace(log_decay=jnp.zeros_like(inputs.lr)),
                                      memory=spec, initial_state=state, chunk_size=4)  # fmt: skip
    np.testing.assert_array_equal(no_decay, zero_decay)
    low, low_final = jit_neural_memory(inputs.replace(v=inputs.v.astype(jnp.bfloat16)), memory=spec,
                                       initial_state=state, output_final_state=True)  # fmt: skip
    assert low.dtype == jnp.bfloat16 and low_final.weights["W1"].dtype == jnp.float32
    norms = state_norms(final)
    assert set(norms) == {"weights/W1", "weights/W2"} and norms["weights/W1"].shape == (HEADS,)
    expected = np.mean(np.linalg.norm(np.asarray(final.weights["W2"]), axis=(-2, -1)), axis=0)
    np.testing.assert_allclose(norms["weights/W2"], expected, rtol=1e-6)


def test_api_rejects_bad_input():
    spec = MemorySpec(architecture="mlp", rule="momentum")
    inputs, state = make_inputs(spec, seq_len=5, seed=11)
    q, k, v, lr, momentum, log_decay = (getattr(inputs, name) for name in
                                        ("q", "k", "v", "lr", "momentum", "log_decay"))  # fmt: skip

    def call(**changes):
        fields = {name: changes.pop(name) for name in list(changes) if hasattr(inputs, name)}
        arguments = {"memory": spec, "initial_state": state, **changes}
        return neural_memory(inputs.replace(**fields), **arguments)

    for changes in (
        dict(k=k[:, :4]),
        dict(v=v[..., :4]),  # Dv = 4: the state's weights are D -> D
        dict(lr=lr[..., None]),
        dict(momentum=None),
        dict(log_decay=log_decay[:, :3]),
        dict(chunk_size=0),
        dict(impl="fast"),
        dict(initial_state=state._replace(momentum=None)),
        dict(initial_state=state._replace(weights={"W1": state.weights["W1"]})),
        dict(memory=MemorySpec(architecture="mlp", rule="gd")),
    ):
        with pytest.raises(ValueError):
            call(**changes)
    with pytest.raises(ValueError, match="impl='pallas' on backend 'cpu'"):
        call(impl="pallas")  # forced kernels: tests/pallas_kernels/test_neural_memory_dispatch.py
    with pytest.raises(ValueError):
        MemorySpec(bias="cauchy")  # an unknown bias (huber is a choice since issue 5)


# ----------------------------------------------------------------------- numerical health


@pytest.mark.parametrize(
    "spec, dtype",
    [
        (MemorySpec(architecture="mlp", bias="l2", rule="momentum"), jnp.float32),
        (MemorySpec(architecture="mlp", bias="l2", rule="momentum"), jnp.bfloat16),
        (MemorySpec(architecture="matrix", bias="l2", rule="gd"), jnp.bfloat16),
    ],
    ids=["titans-f32", "titans-bf16", "gated-delta-bf16"],
)
def test_long_sequence_stays_finite_and_bounded(spec, dtype):
    """T = 4096 with a default-like init: small weights (std 0.02), theta in 0.01..0.1,
    g = -softplus(2x - 3) (strong and weak forgetting), unit q/k, eta ~ sigmoid(x + 2)."""
    rng = np.random.default_rng(12)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    shape = (1, 4096, HEADS)
    q, k, v = unit(normal(*shape, DIM)), unit(normal(*shape, DIM)), normal(*shape, DIM)
    lr = 0.01 + 0.09 * jax.nn.sigmoid(normal(*shape))
    momentum = jax.nn.sigmoid(normal(*shape) + 2.0) if spec.rule == "momentum" else None
    log_decay = -jax.nn.softplus(2.0 * normal(*shape) - 3.0)
    initial = {n: 0.02 * normal(HEADS, *s) for n, s in spec.weight_shapes(DIM, DIM).items()}
    state = init_state(spec, initial, 1)
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    run = jax.jit(lambda *a: neural_memory(MemoryInputs(*a), memory=spec, initial_state=state,
                                           chunk_size=16, output_final_state=True))  # fmt: skip
    output, final = run(*map(cast, (q, k, v, lr, momentum, log_decay)))
    output = np.asarray(output, np.float32)
    assert np.all(np.isfinite(output))
    # The MLP output is q + LN(.), so |o| <= |q| + sqrt(D); the delta rule keeps |o| ~ |v|.
    assert np.max(np.linalg.norm(output, axis=-1)) < 1.0 + np.sqrt(DIM) + 1e-2
    for name, norm in state_norms(final).items():
        assert np.all(np.isfinite(norm)) and np.all(np.asarray(norm) < 100.0), name
