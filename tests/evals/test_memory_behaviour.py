"""Memory-behaviour traces: their memories are the layers' own (outputs and final states
match the recurrences the layers run), and `trace` reads the right layers of a model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from evals import memory_behaviour
from models.registry import build_model
from pallas_kernels import linear_memory, neural_memory
from pallas_kernels.neural_memory import MemorySpec

# Float32 scans of the same update in a different order (token scan vs chunked / reference
# scan): agreement to ~1e-6 relative; 1e-5 leaves room for accumulation over 12 tokens.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
BATCH, LENGTH, HEADS, DIM = 2, 12, 2, 8


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def random_inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    shape = (BATCH, LENGTH, HEADS, DIM)
    return {
        "q": unit(jax.random.normal(keys[0], shape)),
        "k": unit(jax.random.normal(keys[1], shape)),
        "v": jax.random.normal(keys[2], shape),
        "g": -jax.nn.softplus(jax.random.normal(keys[3], shape[:3])),
        "beta": jax.nn.sigmoid(jax.random.normal(keys[4], shape[:3])),
        "lr": 0.1 * jax.nn.sigmoid(jax.random.normal(keys[5], shape[:3])),
    }


RECURRENCES = {
    "linear_attention": lambda x, **kw: linear_memory.linear_attention(
        x["q"], x["k"], x["v"], **kw
    ),
    "gla": lambda x, **kw: linear_memory.simple_gla(x["q"], x["k"], x["v"], x["g"], **kw),
    "deltanet": lambda x, **kw: linear_memory.delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw),
    "gated_deltanet": lambda x, **kw: linear_memory.gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], **kw
    ),
}


@pytest.mark.parametrize("rule", sorted(RECURRENCES))
def test_linear_trace_is_the_layer_recurrence(rule):
    x = random_inputs()
    traced, outputs = memory_behaviour.linear_memory_trace(
        rule, x["q"], x["k"], x["v"], x["g"], x["beta"]
    )
    expected, final_state = RECURRENCES[rule](x, output_final_state=True, impl="reference")
    np.testing.assert_allclose(outputs, expected, **TOLERANCE)
    final_norm = jnp.mean(jnp.linalg.norm(final_state, axis=(-2, -1)))
    np.testing.assert_allclose(traced["state_norm"][-1], final_norm, **TOLERANCE)
    # The memory starts empty: retrieving the first pair before writing gives 0, error ||v||.
    np.testing.assert_allclose(traced["error_before"][0], traced["value_norm"][0], **TOLERANCE)
    # After one token the only past pair is the current one.
    np.testing.assert_allclose(traced["recall_error"][0], traced["error_after"][0], **TOLERANCE)
    assert all(traced[name].shape == (LENGTH,) for name in memory_behaviour.QUANTITIES)


@pytest.mark.parametrize("rule", ["linear_attention", "gla"])
def test_normalized_trace_is_the_normalized_recurrence(rule):
    """With linear attention's normaliser the trace reads S^T x / (z^T x + eps), as the
    layer's recurrence does (positive keys and queries, as elu + 1 gives)."""
    x = random_inputs(2)
    q, k = (jax.nn.elu(x[name]) + 1.0 for name in ("q", "k"))
    traced, outputs = memory_behaviour.linear_memory_trace(
        rule, q, k, x["v"], x["g"], None, normalize=True
    )
    g = x["g"] if rule == "gla" else None
    expected, final_state = linear_memory.normalized_recurrence(
        rule, q, k, x["v"], g, output_final_state=True, impl="reference"
    )
    np.testing.assert_allclose(outputs, expected, **TOLERANCE)
    final_norm = jnp.mean(jnp.linalg.norm(final_state[..., :-1], axis=(-2, -1)))
    np.testing.assert_allclose(traced["state_norm"][-1], final_norm, **TOLERANCE)
    # The first pair is the only one stored after token 0: with the normaliser its read is
    # v_0 k_0^T k_0 / (k_0^T k_0 + eps), i.e. v_0 up to eps.
    np.testing.assert_allclose(traced["error_after"][0], 0.0, atol=1e-5)


def test_delta_rule_write_reduces_the_error():
    """With beta in (0, 1) and unit keys, the delta rule moves S^T k a beta fraction of the
    way to v: ||S_t^T k_t - v_t|| = (1 - beta_t) ||S~^T k_t - v_t|| (no decay: S~ = S)."""
    x = random_inputs(1)
    traced, _ = memory_behaviour.linear_memory_trace(
        "deltanet", x["q"], x["k"], x["v"], None, x["beta"]
    )
    # Holds per (b, h) token; the mean over (b, h) of the after-errors is bounded by it.
    assert np.all(traced["error_after"] <= traced["error_before"] + 1e-6)


def test_unwritten_heads_are_left_out_of_the_errors():
    """Mixture-of-Memories' rule: a memory (head) a token is not routed to gets beta = 0 and
    is left out of that token's errors; a head never written is left out entirely, so the
    errors equal those of the written head alone."""
    x = random_inputs(4)
    beta = x["beta"].at[:, :, 1].set(0.0)  # head 1: never written, its state stays 0
    written = jnp.ones(beta.shape, bool).at[:, :, 1].set(False)
    traced, _ = memory_behaviour.linear_memory_trace(
        "gated_deltanet", x["q"], x["k"], x["v"], x["g"], beta, written=written
    )
    alone, _ = memory_behaviour.linear_memory_trace(
        "gated_deltanet", *(x[n][:, :, :1] for n in ("q", "k", "v", "g")), beta[:, :, :1]
    )
    for name in ("error_before", "error_after", "recall_error", "value_norm"):
        np.testing.assert_allclose(traced[name], alone[name], **TOLERANCE)
    np.testing.assert_allclose(traced["state_norm"], alone["state_norm"] / 2, **TOLERANCE)


SPECS = {
    "titans_mlp_momentum": MemorySpec(architecture="mlp", depth=2, rule="momentum"),
    "matrix_gd": MemorySpec(architecture="matrix", rule="gd"),
    # ATLAS / Miras choices: Omega window across chunks, muon, lp / huber, lq / kl.
    "atlas": MemorySpec(rule="muon", omega_window=3),
    "moneta": MemorySpec(bias="lp", retention="lq"),
    "yaad": MemorySpec(bias="huber"),
    "memora": MemorySpec(retention="kl"),
    # Memora's default chunk (Miras §5.4): the trace reads the weights in weight space.
    "memora_lag_token": MemorySpec(retention="kl", kl_chunk_form="lag_token", rule="gd"),
}


FLOAT64_CASES = ("atlas", "memora", "memora_lag_token", "moneta")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_neural_trace_is_the_chunked_recurrence(name):
    # Memora's memory is ill-conditioned in float32: simplex weights make the last layer's
    # pre-activation nearly constant across features, and the memory's LN divides by its
    # tiny spread, so two float32 orders differ by ~1e-4 (each ~1e-3 from float64). ATLAS's
    # Newton-Schulz and Moneta's lq map amplify rounding too: on an Intel Xeon (AVX-512)
    # their float32 trace and chunked form differed by 2.3e-5 (3 of 384 elements past 1e-5).
    # These cases check the algebra in float64, where the two agree to ~1e-12.
    with jax.enable_x64(name in FLOAT64_CASES):
        _check_trace_against_chunked(SPECS[name])


def _check_trace_against_chunked(spec):
    chunk_size = 4  # 12 tokens: 3 chunks
    x = random_inputs(2)
    if jax.config.jax_enable_x64:
        x = {name: value.astype(jnp.float64) for name, value in x.items()}
    eta = 0.9 * jax.nn.sigmoid(x["beta"]) if spec.learning_rule.uses_momentum else None
    extra = {}
    if spec.bias == "huber":  # thresholds around the error scale: both branches are taken
        extra["huber_delta"] = 0.5 + jax.nn.sigmoid(x["g"])
    if spec.omega_window > 1:
        extra["omega_gate"] = x["beta"]
    shapes = spec.weight_shapes(DIM, DIM)
    keys = jax.random.split(jax.random.key(3), len(shapes))
    initial = {
        leaf: jax.random.normal(key, (HEADS,) + shape, x["v"].dtype) * shape[0] ** -0.5
        for key, (leaf, shape) in zip(keys, shapes.items())
    }
    state = neural_memory.init_state(spec, initial, BATCH)  # float32 ...
    state = jax.tree.map(lambda leaf: leaf.astype(x["v"].dtype), state)  # ... or float64
    inputs = neural_memory.MemoryInputs(x["q"], x["k"], x["v"], x["lr"], eta, x["g"], extra)
    traced, outputs = memory_behaviour.neural_memory_trace(spec, inputs, state, chunk_size)
    expected, final_state = neural_memory.neural_memory(
        inputs, memory=spec, initial_state=state, chunk_size=chunk_size,
        output_final_state=True, impl="chunked",
    )  # fmt: skip
    np.testing.assert_allclose(outputs, expected, **TOLERANCE)
    if spec.lag_token_chunk:  # the state handed on is the chunk-end W back on the simplex,
        return  # not the weights the last token read (which the trace reports)
    weights = spec.effective_weights(final_state.weights)  # what the network reads
    squares = sum(jnp.sum(jnp.square(w), axis=(-2, -1)) for w in weights.values())
    np.testing.assert_allclose(traced["state_norm"][-1], jnp.mean(jnp.sqrt(squares)), **TOLERANCE)
    np.testing.assert_allclose(traced["recall_error"][0], traced["error_after"][0], **TOLERANCE)


def tiny_model(pattern, **options):
    """options: "kind__key" = value, set on model.<kind>.<key>."""
    config = base.get_config()
    config.model.vocab_size, config.model.d_model, config.model.num_heads = 32, 16, 2
    config.model.num_layers, config.model.block_pattern = len(pattern), pattern
    for name, value in options.items():
        kind, key = name.split("__")
        config.model[kind][key] = value
    return build_model(config.model, rngs=nnx.Rngs(0))


def test_trace_reads_each_memory_layer_of_a_model():
    model = tiny_model(("gdn", "attention"))
    tokens = np.random.default_rng(0).integers(0, 32, (2, 10))
    traced = memory_behaviour.trace(model, tokens)
    assert traced["layer_01"] == {"kind": "attention", "skipped": traced["layer_01"]["skipped"]}
    gdn = traced["layer_00"]
    assert gdn["kind"] == "gdn" and all(gdn[q].shape == (10,) for q in memory_behaviour.QUANTITIES)
    # The model's own logged final-state norm is the trace's last state norm.
    aux = nnx.jit(lambda model, tokens: model(tokens)[1])(model, jnp.asarray(tokens))
    np.testing.assert_allclose(gdn["state_norm"][-1], aux["layer_00/state_norm"], **TOLERANCE)
    np.testing.assert_allclose(gdn["error_before"][0], gdn["value_norm"][0], **TOLERANCE)

    scalars = memory_behaviour.scalars(traced)
    assert sorted(scalars) == [f"memory/layer_00/{q}" for q in sorted(scalars_names())]
    figure = memory_behaviour.figure(traced)
    assert len(figure.axes) == 3 and len(figure.axes[1].lines) == 2  # before and after


@pytest.mark.parametrize("kind", ["atlas", "yaad", "mac"])
def test_trace_reads_deep_memory_layers(kind):
    """The ATLAS / Miras blocks are traced (Omega window, muon, Huber thresholds from the
    layer's own projections), MAC on its segments' attention outputs (3 segments of 4, in
    chunks of 2: no padding), and the trace ends at the model's own final memory."""
    model = tiny_model((kind,), mac__segment_size=4, mac__chunk_size=2)
    tokens = np.random.default_rng(1).integers(0, 32, (2, 12))
    traced = memory_behaviour.trace(model, tokens)["layer_00"]
    assert "skipped" not in traced and all(np.all(np.isfinite(traced[q])) for q in scalars_names())
    aux = nnx.jit(lambda model, tokens: model(tokens)[1])(model, jnp.asarray(tokens))
    # The model logs mean_{b,h} ||W_l|| per layer l; the trace mean_{b,h} sqrt(sum_l ||W_l||^2)
    # of the same final state lies between the norm and the sum of those means (Jensen and
    # the triangle inequality), up to float32 rounding.
    logged = np.array([aux[f"layer_00/memory_norm/{name}"] for name in ("W1", "W2")])
    final = traced["state_norm"][-1]
    assert np.sqrt(np.sum(logged**2)) * (1 - 1e-5) <= final <= np.sum(logged) * (1 + 1e-5)
    if kind == "mac":  # exactly: the final state of MAC's own segment loop
        x = nnx.jit(lambda model, tokens: model.block_inputs(tokens))(model, jnp.asarray(tokens))[0]
        positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
        state = nnx.jit(lambda block, x: block.segments(x, positions)[1])(model.blocks[0], x)
        squares = sum(jnp.sum(jnp.square(w), axis=(-2, -1)) for w in state.weights.values())
        np.testing.assert_allclose(final, jnp.mean(jnp.sqrt(squares)), **TOLERANCE)


def test_trace_reads_every_memory_of_a_mixture():
    model = tiny_model(("mom",))
    tokens = np.random.default_rng(2).integers(0, 32, (2, 10))
    traced = memory_behaviour.trace(model, tokens)["layer_00"]
    assert "skipped" not in traced and all(np.all(np.isfinite(traced[q])) for q in scalars_names())
    # The model logs the mean norm of its memories' final states: the trace's last.
    aux = nnx.jit(lambda model, tokens: model(tokens)[1])(model, jnp.asarray(tokens))
    np.testing.assert_allclose(traced["state_norm"][-1], aux["layer_00/state_norm"], **TOLERANCE)


def scalars_names():
    return ("state_norm", "recall_error", "error_before", "error_after")
