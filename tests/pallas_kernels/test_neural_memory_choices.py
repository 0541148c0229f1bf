"""The Miras / ATLAS choices of the deep memory (issue 5): lp and huber biases, lq and kl
retention, the muon rule and the Omega window -- chunked form vs the token-by-token
references, gradients, special cases that must reduce to l2 / the online rule, the API,
and numerical health on a long sequence.

Inputs follow the default-like regime of test_neural_memory.py (unit-norm q/k, theta = 0.05
sigmoid(.), g = -softplus(. - 4), eta = sigmoid(.), weights ~ N(0, 1/d_in)); kl's initial
logits are N(0, 1): with near-uniform softmax weights the MLP's LN divides by the spread of
an almost constant z_L, which amplifies float32 rounding past the tolerance (the float64
checks show the algebra is exact either way). Huber thresholds delta ~ 2 + 3 sigmoid(.) put
about a quarter of the tokens on the l2 side of the switch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.neural_memory import (
    MemoryInputs,
    MemorySpec,
    NeuralMemoryState,
    chunked,
    chunked_materialised,
    init_state,
    neural_memory,
    read,
    reference,
    state_norms,
    step,
)
from pallas_kernels.neural_memory.choices_miras import empty_window
from pallas_kernels.neural_memory.memory_inputs import from_named

# Shapes and tolerances (fixed once, with their reasons) shared with the Titans tests.
from tests.pallas_kernels.test_neural_memory import (
    BATCH,
    DIM,
    F32_TOL,
    F64_TOL,
    GRAD_TOL,
    HEADS,
    max_relative_error,
)

MODELS = {  # the combinations the Miras / ATLAS models use
    "moneta": MemorySpec(
        bias="lp", lp_p=3.0, retention="lq", lq_q=4.0, lq_normaliser="chunk_start", rule="gd"
    ),
    "yaad": MemorySpec(bias="huber", retention="gated_decay", rule="gd"),
    "memora": MemorySpec(bias="l2", retention="kl", kl_chunk_form="lag_token", rule="gd"),
    "atlas": MemorySpec(omega_window=3, rule="muon", retention="gated_decay"),
    "omeganet": MemorySpec(omega_window=3, rule="gd", retention="gated_decay"),
}
SINGLE_CHOICES = {  # the new choices in other combinations, incl. the matrix memory
    "moneta-token-normaliser": MemorySpec(bias="lp", lp_p=3.0, retention="lq", lq_q=4.0, rule="gd"),
    "lq-chunk-start-momentum": MemorySpec(retention="lq", lq_normaliser="chunk_start"),
    "memora-exact": MemorySpec(bias="l2", retention="kl", rule="gd"),
    "lp-lq-momentum": MemorySpec(bias="lp", retention="lq", rule="momentum"),
    "huber-kl-matrix-momentum": MemorySpec(
        architecture="matrix", bias="huber", retention="kl", rule="momentum"
    ),
    "muon-omega2-matrix": MemorySpec(architecture="matrix", rule="muon", omega_window=2),
    "yaad-huber-norm": MemorySpec(bias="huber_norm", retention="gated_decay", rule="gd"),
    "atlas-pair-gates": MemorySpec(omega_window=3, omega_gates="pair", rule="muon"),
}
GRADIENT_SPECS = {  # every new input (huber_delta, omega_gate) and choice has a gradient
    "moneta": MODELS["moneta"],
    "moneta-token-normaliser": SINGLE_CHOICES["moneta-token-normaliser"],
    "memora-exact": SINGLE_CHOICES["memora-exact"],
    "atlas-huber": MemorySpec(bias="huber", omega_window=3, rule="muon"),
    "omeganet-pair-gates": MemorySpec(omega_window=3, omega_gates="pair", rule="gd"),
}
# Chunk 8 as well as 4 for the models with the most machinery (the materialised chunk step).
LARGER_CHUNK = ("atlas", "memora", "memora-exact")
ALL_SPECS = {**MODELS, **SINGLE_CHOICES}


def is_huber(spec):
    """The spec's bias takes the per-token Huber threshold (both Huber biases declare it)."""
    return any(item.name == "huber_delta" for item in spec.extra_inputs)


def make_inputs(spec, seq_len, seed=0, dtype=jnp.float32, batch=BATCH):
    """(MemoryInputs with the extras the spec declares (huber_delta, omega_gate or the pair
    gates), state)."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    shape = (batch, seq_len, HEADS)
    q, k, v = unit(normal(*shape, DIM)), unit(normal(*shape, DIM)), normal(*shape, DIM)
    lr = 0.05 * jax.nn.sigmoid(normal(*shape))
    momentum = jax.nn.sigmoid(normal(*shape)) if spec.learning_rule.uses_momentum else None
    log_decay = -jax.nn.softplus(normal(*shape) - 4.0)
    extras = {
        "huber_delta": 2.0 + 3.0 * jax.nn.sigmoid(normal(*shape)) if is_huber(spec) else None,
        "omega_gate": jax.nn.sigmoid(normal(*shape)) if spec.omega_window > 1 else None,
    }
    if spec.omega_gates == "pair":  # c gates per token instead of one
        del extras["omega_gate"]
        extras.update({item.name: jax.nn.sigmoid(normal(*shape)) for item in spec.extra_inputs})
    extras = {name: x for name, x in extras.items() if x is not None}
    shapes = spec.weight_shapes(DIM, DIM)
    spread = (lambda s: 1.0) if spec.retention == "kl" else (lambda s: 1.0 / np.sqrt(s[0]))
    weights = {n: normal(batch, HEADS, *s) * spread(s) for n, s in shapes.items()}
    state_momentum = None
    if spec.learning_rule.uses_momentum:  # a nonzero carried momentum exercises D_t
        state_momentum = {n: 0.1 * normal(batch, HEADS, *s) for n, s in shapes.items()}
    window = empty_window(spec, batch, HEADS, DIM, DIM, dtype)
    if window is not None:  # a window carried from "before": real tokens, not zeros
        window = {name: normal(*x.shape) for name, x in window.items()}
        window["k"] = unit(window["k"])
        window["gate"] = jax.nn.sigmoid(window["gate"])
        if "huber_delta" in window:
            window["huber_delta"] = 2.0 + 3.0 * jax.nn.sigmoid(window["huber_delta"])
    state = NeuralMemoryState(weights, state_momentum, window)
    return MemoryInputs(q, k, v, lr, momentum, log_decay, extras), state


def run_exact(spec, inputs, state):
    return jax.jit(lambda *a: reference.exact_scan(spec, *a))(inputs, state)


def run_chunk_start(spec, inputs, state, chunk_size):
    return jax.jit(lambda *a: reference.chunk_start_scan(spec, *a, chunk_size))(inputs, state)


def run_chunked(spec, inputs, state, chunk_size):
    return jax.jit(lambda *a: chunked.chunked_scan(spec, *a, chunk_size))(inputs, state)


# ------------------------------------------------------------------ chunked vs references


# KL retention (Memora) is compared in float64 only: its near-uniform softmax weights make
# the LN divide by an almost constant z_L (module doc), and the float32 run's rounding
# depends on the CPU and on how XLA fuses the recomputed chunk (memora: 1.1e-5 against 1e-5
# on an AMD EPYC after the chunk scan's backward recompute, below it on an Intel Xeon).
FLOAT64_ONLY = ("memora", "memora-exact")


def _check_against_references(spec, name, args, tolerance):
    """chunk 1 == exact rule; chunk 4 (and 8) == chunk-start rule. (lq read at its
    chunk-start norm is not the exact rule at chunk 1: it reads with the previous token's
    norm, so its chunk 1 is held to the chunk-start rule too.)"""
    exact = run_exact(spec, *args)
    chunk_sizes = (4, 8) if name in LARGER_CHUNK else (4,)
    if spec.chunk_read_scale is None:
        assert max_relative_error(run_chunked(spec, *args, 1), exact) < tolerance
    else:
        chunk_sizes = (1,) + chunk_sizes
    for chunk_size in chunk_sizes:
        expected = run_chunk_start(spec, *args, chunk_size)
        actual = run_chunked(spec, *args, chunk_size)
        assert max_relative_error(actual, expected) < tolerance, chunk_size
        # Guards against comparing two things that cannot differ.
        assert max_relative_error(expected, exact) > 10 * F32_TOL


@pytest.mark.parametrize("name", sorted(set(ALL_SPECS) - set(FLOAT64_ONLY)))
def test_chunked_matches_references(name):
    """T = 11 (partial chunks), float32; the KL kinds in float64 (below)."""
    spec = ALL_SPECS[name]
    _check_against_references(spec, name, make_inputs(spec, seq_len=11, seed=1), F32_TOL)


@pytest.mark.parametrize("name", FLOAT64_ONLY)
def test_chunked_matches_references_in_float64(name):
    spec = ALL_SPECS[name]
    with jax.enable_x64(True):
        args = make_inputs(spec, seq_len=11, seed=1, dtype=jnp.float64)
        _check_against_references(spec, name, args, F64_TOL)


def test_atlas_algebra_in_float64():
    """ATLAS's Newton-Schulz amplifies rounding too: its float64 check beside the float32 one
    (the KL kinds' float64 check is `test_chunked_matches_references_in_float64`)."""
    spec = ALL_SPECS["atlas"]
    with jax.enable_x64(True):
        args = make_inputs(spec, seq_len=6, seed=2, dtype=jnp.float64)
        exact = reference.exact_scan(spec, *args)
        chunked_one = chunked.chunked_scan(spec, *args, 1)
        assert max_relative_error(chunked_one, exact) < F64_TOL
        expected = reference.chunk_start_scan(spec, *args, 4)
        assert max_relative_error(chunked.chunked_scan(spec, *args, 4), expected) < F64_TOL


def test_materialised_chunk_equals_the_linear_one():
    """The per-token pass of `chunked_materialised` on Titans' choices (Omega window 2, so
    the window layout is shared too) equals the attention-like linear chunk."""
    spec = MemorySpec(rule="momentum", omega_window=2)
    inputs, state = make_inputs(spec, seq_len=6, seed=3)
    chunk = inputs.map(lambda name, x: jnp.moveaxis(x, 1, 2))  # heads-major
    for last in (5, 3):  # rows after `last` are padding: callers discard them
        linear = jax.jit(chunked.chunk_step, static_argnums=0)(spec, state, chunk, last)
        materialised = jax.jit(chunked_materialised.chunk_step, static_argnums=0)(
            spec, state, chunk, last
        )
        assert max_relative_error(materialised[0], linear[0]) < F32_TOL
        rows = slice(0, last + 1)
        assert max_relative_error(materialised[1][:, :, rows], linear[1][:, :, rows]) < F32_TOL


def test_omega_window_state_makes_chunks_self_contained():
    """Two calls (8 tokens, then 6 from the returned state) == one call on 14 tokens, with
    chunk 4 and c = 3: the window crosses chunk and call boundaries."""
    spec = MODELS["atlas"]
    inputs, state = make_inputs(spec, seq_len=14, seed=4)
    whole = run_chunked(spec, inputs, state, 4)

    def part(start, stop):
        return inputs.map(lambda name, x: x[:, start:stop])

    first = run_chunked(spec, part(0, 8), state, 4)
    second = run_chunked(spec, part(8, 14), first[1], 4)
    joined = jnp.concatenate([first[0], second[0]], axis=1)
    assert max_relative_error((joined, second[1]), whole) < F32_TOL


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", sorted(GRADIENT_SPECS))
def test_gradients_match_chunk_start_scan(name):
    """d(random functional of outputs and final state) / d(every input, initial weights)."""
    spec = GRADIENT_SPECS[name]
    inputs, state = make_inputs(spec, seq_len=6, seed=5)
    initial_weights = {n: leaf[0] for n, leaf in state.weights.items()}  # [H, ...]

    def loss(run, inputs, initial_weights):
        rng = np.random.default_rng(6)  # the same probes for both runs
        start = init_state(spec, initial_weights, BATCH)
        output, final = run(inputs, start)
        leaves = [output] + jax.tree.leaves(final)
        probes = [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in leaves]
        return sum(jnp.sum(x * p) for x, p in zip(leaves, probes))

    def expected_run(inputs, start):
        return reference.chunk_start_scan(spec, inputs, start, 4)

    def actual_run(inputs, start):
        return chunked.chunked_scan(spec, inputs, start, 4)

    grads = [
        jax.jit(jax.grad(lambda x, w, run=run: loss(run, x, w), argnums=(0, 1)))(
            inputs, initial_weights
        )
        for run in (expected_run, actual_run)
    ]
    expected, actual = grads
    for key in list(inputs.named()) + ["initial"]:
        e = expected[1] if key == "initial" else expected[0].named()[key]
        a = actual[1] if key == "initial" else actual[0].named()[key]
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(a)), key
        assert max_relative_error(a, e) < GRAD_TOL, key


def test_lag_token_gradients_in_float64():
    """Memora's lag-token chunk: gradients of the chunked form == its token-by-token oracle.
    In float64: the chunk-end return to log-probabilities, log(W / c), divides by entries
    near the probability floor, which amplifies float32 rounding to ~5e-4 of the largest
    gradient (measured; the algebra agrees to ~1e-12 in float64)."""
    spec = MODELS["memora"]
    with jax.enable_x64(True):
        inputs, state = make_inputs(spec, seq_len=6, seed=5, dtype=jnp.float64)

        def loss(run, inputs, weights):
            output, final = run(inputs, state._replace(weights=weights))
            probes = np.random.default_rng(6)  # the same probes for both runs
            leaves = [output] + jax.tree.leaves(final)
            return sum(jnp.sum(x * probes.standard_normal(x.shape)) for x in leaves)

        runs = (
            lambda x, s: reference.chunk_start_scan(spec, x, s, 4),
            lambda x, s: chunked.chunked_scan(spec, x, s, 4),
        )
        expected, actual = (
            jax.jit(jax.grad(lambda x, w, run=run: loss(run, x, w), argnums=(0, 1)))(
                inputs, state.weights
            )
            for run in runs
        )
        for key in inputs.named():
            a, e = actual[0].named()[key], expected[0].named()[key]
            assert max_relative_error(a, e) < F64_TOL, key
        assert max_relative_error(actual[1], expected[1]) < F64_TOL


# ------------------------------------------------------------- special cases and pieces


@pytest.mark.parametrize("impl", ["exact", "chunk4"])
def test_special_cases_reduce_to_l2_and_the_online_rule(impl):
    """lp with p = 2 and huber with a huge threshold are l2: the same float operations, but
    XLA may fuse the three programs differently (jax 0.12 does for the chunked form), so
    they are compared in float64, where fusion-order rounding is ~1e-16. (The Omega rule
    with c = 1 is the online rule by construction: it declares no gate, and the API refuses
    one, see the bad-input test.)"""
    base = MemorySpec(rule="momentum")
    with jax.enable_x64(True):
        inputs, state = make_inputs(base, seq_len=9, seed=7, dtype=jnp.float64)

        def run(spec, **extras):
            if impl == "exact":
                return run_exact(spec, inputs.replace(extra=extras), state)
            return run_chunked(spec, inputs.replace(extra=extras), state, 4)

        expected = run(base)
        huge = jnp.full_like(inputs.lr, 1e6)
        cases = [
            run(MemorySpec(rule="momentum", bias="lp", lp_p=2.0)),
            run(MemorySpec(rule="momentum", bias="huber"), huber_delta=huge),
        ]
        for actual in cases:
            assert max_relative_error(actual, expected) < F64_TOL
        if impl == "exact":  # ... and the choices do change things away from those cases.
            changed = run(MemorySpec(rule="momentum", bias="lp"))
            assert max_relative_error(changed, expected) > 1e-3


def omega_gated_delta_rule_numpy(k, v, lr, log_decay, gate, window, initial, pair_gates=None):
    """Matrix memory, l2, GD, Omega window c (ATLAS eq. 9) in float64, written out:
    S~ = a_t S, S_t = S~ - theta_t sum_i gamma_i^(t) k_i (S~^T k_i - v_i)^T, o_t = S_t^T k_t,
    gamma_i^(t) = gamma_i (gate [B, T, H]), times token t's gate for slot i - t + c - 1 when
    `pair_gates` [B, T, H, c] is given."""
    k, v, lr, log_decay, gate = (np.asarray(x, np.float64) for x in (k, v, lr, log_decay, gate))
    keys = np.concatenate([np.asarray(window["k"], np.float64), np.moveaxis(k, 1, 2)], axis=2)
    values = np.concatenate([np.asarray(window["v"], np.float64), np.moveaxis(v, 1, 2)], 2)
    gates = np.concatenate([np.asarray(window["gate"], np.float64), np.moveaxis(gate, 1, 2)], 2)
    size = window["gate"].shape[-1] + 1
    state, outputs = np.array(initial, np.float64), []
    for t in range(k.shape[1]):
        retained = np.exp(log_decay[:, t])[..., None, None] * state
        update = 0.0
        for i in range(t, t + size):  # the window of token t in the joined arrays
            error = np.einsum("bhkv,bhk->bhv", retained, keys[:, :, i]) - values[:, :, i]
            outer = np.einsum("bhk,bhv->bhkv", keys[:, :, i], error)
            weight = gates[:, :, i]
            if pair_gates is not None:  # token t's own gate for this slot (oldest first)
                weight = weight * np.asarray(pair_gates, np.float64)[:, t, :, i - t]
            update = update + weight[..., None, None] * outer
        state = retained - lr[:, t, :, None, None] * update
        outputs.append(np.einsum("bhkv,bhk->bhv", state, k[:, t]))
    return np.stack(outputs, axis=1), state


def test_omega_rule_matches_a_written_out_window():
    spec = MemorySpec(architecture="matrix", rule="gd", omega_window=3)
    inputs, state = make_inputs(spec, seq_len=10, seed=8)
    k, v, lr, log_decay = inputs.k, inputs.v, inputs.lr, inputs.log_decay
    output, final = run_exact(spec, inputs.replace(q=k), state)
    expected_output, expected_state = omega_gated_delta_rule_numpy(
        k, v, lr, log_decay, inputs.extra["omega_gate"], state.window, state.weights["W"]
    )
    assert max_relative_error(output, expected_output) < F32_TOL
    assert max_relative_error(final.weights["W"], expected_state) < F32_TOL


def test_pair_gates_match_a_written_out_window():
    """omega_gates="pair": eq. 9's gamma_i^(t), token t's gate for each slot of its window."""
    spec = MemorySpec(architecture="matrix", rule="gd", omega_window=3, omega_gates="pair")
    inputs, state = make_inputs(spec, seq_len=10, seed=8)
    names = [item.name for item in spec.extra_inputs]
    assert names == ["omega_pair_gate_0", "omega_pair_gate_1", "omega_pair_gate_2"]
    pair_gates = jnp.stack([inputs.extra[name] for name in names], axis=-1)
    k, v, lr, log_decay = inputs.k, inputs.v, inputs.lr, inputs.log_decay
    ones = jnp.ones_like(lr)  # no per-token gate: the window's stored gates stay as carried
    for run in (run_exact, lambda *a: run_chunked(*a, 1)):  # chunk 1 is the exact rule
        output, final = run(spec, inputs.replace(q=k), state)
        expected_output, expected_state = omega_gated_delta_rule_numpy(
            k, v, lr, log_decay, ones, state.window, state.weights["W"], pair_gates
        )
        assert max_relative_error(output, expected_output) < F32_TOL
        assert max_relative_error(final.weights["W"], expected_state) < F32_TOL
    # Per (t, i) is not per i: the same gates read as token gates give another memory.
    token_spec = MemorySpec(architecture="matrix", rule="gd", omega_window=3)
    as_token = inputs.replace(q=k, extra={"omega_gate": pair_gates[..., -1]})
    assert max_relative_error(run_exact(token_spec, as_token, state)[0], output) > 1e-3


def test_pair_gates_need_a_window_and_all_their_slots():
    with pytest.raises(ValueError, match="omega_gates='pair'; expected omega_window > 1"):
        MemorySpec(omega_gates="pair")
    with pytest.raises(ValueError, match="omega_gates='slot'; expected one of"):
        MemorySpec(omega_window=2, omega_gates="slot")
    spec = MemorySpec(architecture="matrix", rule="gd", omega_window=3, omega_gates="pair")
    inputs, state = make_inputs(spec, seq_len=4, seed=8)
    partial = {"omega_pair_gate_0": inputs.extra["omega_pair_gate_0"]}
    with pytest.raises(ValueError, match="missing"):
        run_exact(spec, inputs.replace(extra=partial), state)


def test_newton_schulz_matches_optim_and_kl_weights_are_distributions():
    from optim.newton_schulz import QUINTIC_COEFFICIENTS, orthogonalize
    from pallas_kernels.neural_memory.choices_miras import newton_schulz

    rng = np.random.default_rng(9)
    for shape in ((3, 8, 16), (3, 16, 8)):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        expected = orthogonalize(x, steps=5, dtype=jnp.float32)
        assert max_relative_error(newton_schulz(x, 5, QUINTIC_COEFFICIENTS), expected) < 1e-5
    spec = MemorySpec(retention="kl", kl_scale=2.0)
    logits = {"W1": jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)}
    weights = spec.effective_weights(logits)["W1"]
    assert np.all(np.asarray(weights) > 0)
    # Columns sum to c = kl_scale sqrt(d_in): unit norm at uniform probabilities.
    np.testing.assert_allclose(np.sum(weights, axis=-2), 2.0 * 8**0.5, rtol=1e-6)


# --------------------------------------------------------------------------------- api


@pytest.mark.parametrize("name", ["atlas", "yaad", "memora"])
def test_step_by_step_decoding_and_read(name):
    spec = MODELS[name]
    inputs, state = make_inputs(spec, seq_len=6, seed=10)
    expected, expected_final = jax.jit(
        lambda x: neural_memory(
            x, memory=spec, initial_state=state, output_final_state=True, impl="reference"
        )
    )(inputs)
    jit_step = jax.jit(step, static_argnums=0)
    outputs = []
    for t in range(6):
        output, state = jit_step(spec, state, inputs.map(lambda name, x, t=t: x[:, t]))
        outputs.append(output)
    q = inputs.q
    assert max_relative_error(jnp.stack(outputs, axis=1), expected) < F32_TOL
    assert max_relative_error(state, expected_final) < F32_TOL
    # o_T = M_T(q_T): reading the final state at the last query gives the last output.
    last_read = read(spec, expected_final, q[:, -1:])
    assert max_relative_error(last_read, expected[:, -1:]) < F32_TOL


def test_init_state_and_norms():
    spec = MODELS["atlas"]
    initial = {n: jnp.ones((HEADS,) + s) for n, s in spec.weight_shapes(DIM, DIM).items()}
    state = init_state(spec, initial, BATCH)
    assert state.window["k"].shape == (BATCH, HEADS, 2, DIM)
    assert np.all(np.asarray(state.window["gate"]) == 0.0)
    assert jax.tree.map(jnp.shape, state.momentum) == jax.tree.map(jnp.shape, state.weights)
    assert init_state(MODELS["memora"], initial, BATCH).window is None
    kl_norms = state_norms(init_state(MODELS["memora"], initial, BATCH), MODELS["memora"])
    # Uniform softmax over d_in = 8 scaled by sqrt(8): every column has unit norm, so the
    # [8, 16] matrix has Frobenius norm sqrt(16).
    np.testing.assert_allclose(kl_norms["weights/W1"], 4.0, rtol=1e-6)


def test_api_rejects_bad_input_naming_the_argument():
    spec = MODELS["yaad"]
    inputs, state = make_inputs(spec, seq_len=5, seed=11)
    q, lr, delta = inputs.q, inputs.lr, inputs.extra["huber_delta"]
    omega = MemorySpec(omega_window=3, rule="gd")

    def call(extra=None, **changes):
        arguments = {"memory": spec, "initial_state": state, **changes}
        extra = inputs.extra if extra is None else extra
        return neural_memory(inputs.replace(extra=extra), **arguments)

    for changes, named in (
        (dict(extra={}), "huber_delta"),
        (dict(extra={"huber_delta": delta[:, :3]}), "huber_delta"),
        (dict(memory=MemorySpec(bias="l2", rule="gd")), "huber_delta"),
        (dict(memory=omega, extra={"omega_gate": lr[..., None]}), "omega_gate"),
        (dict(memory=MemorySpec(bias="huber", omega_window=1),
              extra={"huber_delta": delta, "omega_gate": lr}), "omega_gate"),  # c = 1: no gate
        (dict(memory=MemorySpec(bias="huber", rule="gd", omega_window=2)), "window"),
        (dict(memory=omega, extra={}, initial_state=state._replace(window={"k": q[:, 0]})),
         "window"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=named):
            call(**changes)
    with pytest.raises(ValueError, match="huber_delta"):
        step(spec, state, inputs.replace(extra={}).map(lambda name, x: x[:, 0]))
    for field, value in (("lp_p", 0.5), ("lq_q", 1.0), ("omega_window", 0),
                         ("ns_coefficients", (1.0, 2.0)), ("kl_scale", 0.0)):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            MemorySpec(**{field: value})


# ----------------------------------------------------------------------- numerical health


INIT_SCALES = {  # the initial stored state, per retention (see the test's docstring)
    "gated_decay": lambda shape: 0.02,
    "lq": lambda shape: shape[0] ** -0.5,
    "kl": lambda shape: 1.0,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_long_sequence_stays_finite_and_bounded(name):
    """T = 4096, float32 and bfloat16 inputs, a default-like regime: theta in 0.01..0.1,
    g = -softplus(2x - 3) (strong and weak forgetting), unit q/k, eta ~ sigmoid(x + 2),
    delta ~ 2 + 3 sigmoid(x), gamma ~ sigmoid(x); initial weights std 0.02 (gated decay),
    accumulator N(0, 1/d_in) (lq), logits N(0, 1) (kl).

    Bounds: |o| <= |q| + sqrt(D) (output q + LN(.)); effective weights < 100, except lq's,
    only checked to be finite: Miras eq. 24 gives ||W||_q = ||A||_q^(3-q), so with q = 4
    forgetting (A shrinking) *grows* W -- here W2 reaches ~1e3 while W1 -> 0 and the LN
    keeps the output bounded; `lq_eps` caps the growth. The muon momentum is a decayed sum
    of raw gradients (only its direction reaches the memory, through NS), so it too is
    only checked to be finite.
    """
    spec = MODELS[name]
    rng = np.random.default_rng(12)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    shape = (1, 4096, HEADS)
    named = {
        "q": unit(normal(*shape, DIM)),
        "k": unit(normal(*shape, DIM)),
        "v": normal(*shape, DIM),
        "lr": 0.01 + 0.09 * jax.nn.sigmoid(normal(*shape)),
        "momentum": (
            jax.nn.sigmoid(normal(*shape) + 2.0) if spec.learning_rule.uses_momentum else None
        ),
        "log_decay": -jax.nn.softplus(2.0 * normal(*shape) - 3.0),
        "huber_delta": 2.0 + 3.0 * jax.nn.sigmoid(normal(*shape)) if is_huber(spec) else None,
        "omega_gate": jax.nn.sigmoid(normal(*shape)) if spec.omega_window > 1 else None,
    }
    scale = INIT_SCALES[spec.retention]
    initial = {n: scale(s) * normal(HEADS, *s) for n, s in spec.weight_shapes(DIM, DIM).items()}
    state = init_state(spec, initial, 1)
    inputs = from_named({name: x for name, x in named.items() if x is not None})
    run = jax.jit(lambda x: neural_memory(x, memory=spec, initial_state=state, chunk_size=16,
                                          output_final_state=True))  # fmt: skip
    for dtype in (jnp.float32, jnp.bfloat16):
        output, final = run(inputs.map(lambda name, x, dtype=dtype: x.astype(dtype)))
        output = np.asarray(output, np.float32)
        assert np.all(np.isfinite(output)), dtype
        assert np.max(np.linalg.norm(output, axis=-1)) < 1.0 + np.sqrt(DIM) + 1e-2
        for leaf in jax.tree.leaves(final):
            assert np.all(np.isfinite(np.asarray(leaf))), dtype
        effective = spec.effective_weights(final.weights)
        for layer, weights in effective.items():
            weights = np.asarray(weights, np.float64)
            assert np.all(np.isfinite(weights)), (layer, dtype)
            if spec.retention != "lq":
                assert np.max(np.linalg.norm(weights, axis=(-2, -1))) < 100.0, (layer, dtype)
