"""The Titans neural-memory layer (`layers.neural_memory`): its matrix corner against Gated
DeltaNet, shapes and annotations, gradients, long-sequence stability, the decoding cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.neural_memory import NeuralMemory
from pallas_kernels import linear_memory
from pallas_kernels.neural_memory import MemorySpec

BATCH, LENGTH, WIDTH, HEADS, HEAD_DIM = 2, 11, 32, 2, 16
# float32 throughout: two implementations of the same sums in another order agree to ~1e-6
# on outputs of size ~1; 1e-5 leaves room for accumulation over a few tokens, no more.
TOL = 1e-5


DEFAULT_SPEC = MemorySpec()  # Titans: MLP depth 2, l2 bias, gated decay, momentum


def _layer(spec=DEFAULT_SPEC, *, chunk_size=4, dtype=jnp.float32, seed=0, **options):
    # Gates that differ by token as the other projections' weights do (init_std; the layer's
    # default starts them all at their biases), so a mix-up of tokens shows.
    options.setdefault("gate_init_std", options.get("init_std", 0.02))
    return NeuralMemory(
        WIDTH,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        spec=spec,
        chunk_size=chunk_size,
        dtype=dtype,
        rngs=nnx.Rngs(seed),
        **options,
    )


@nnx.jit
def _extend(layer, x, cache):
    return layer.extend(x, cache)


def _inputs(length=LENGTH, seed=1):
    return jax.random.normal(jax.random.key(seed), (BATCH, length, WIDTH), jnp.float32)


def test_matrix_l2_gd_memory_is_the_gated_delta_rule():
    """Matrix memory, l2 bias, plain GD, exact rule: S_t = e^g S + θ k (v - e^g S^T k)^T and
    o_t = q S_t, i.e. `gated_delta_rule(..., beta=θ, scale=1)`, with the layer's own q, k,
    v, θ, g and learned initial state."""
    spec = MemorySpec(architecture="matrix", bias="l2", rule="gd")
    layer = _layer(spec, init_std=0.3)
    inputs, _ = layer.features(_inputs())
    state = layer.initial_state(BATCH)
    ours, our_state = layer.recur(inputs, state, chunk_size=1)
    q, k, v, lr, g = inputs.q, inputs.k, inputs.v, inputs.lr, inputs.log_decay
    theirs, their_state = linear_memory.gated_delta_rule(
        q, k, v, g, lr, scale=1.0, initial_state=state.weights["W"], output_final_state=True
    )
    assert float(jnp.max(jnp.abs(ours))) > 0.1  # not trivially zero
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(our_state.weights["W"], their_state, atol=TOL, rtol=TOL)


@pytest.mark.parametrize(
    "spec",
    [MemorySpec(), MemorySpec(architecture="matrix", bias="dot_product", rule="gd")],
    ids=["mlp_momentum", "matrix_dot_gd"],
)
def test_forward_shapes_annotations_and_finite_gradients(spec):
    layer = _layer(spec)
    y, aux = layer(_inputs())
    assert y.shape == (BATCH, LENGTH, WIDTH) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    names = spec.memory_architecture.layer_names
    assert {f"memory_norm/{name}" for name in names} <= set(aux)
    assert all(float(value) > 0 for value in aux.values())

    params = nnx.state(layer, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    for path, param in nnx.to_flat_state(params):
        axes = specs[path].get_value()
        assert len(axes) == param.get_value().ndim and any(axes), (path, axes)
    for name in names:  # per-head initial memory: a stack of matrices over "heads"
        axes = specs[("initial_weights", name)].get_value()
        assert tuple(axes) == ("heads", "memory_state", "memory_state")

    def loss(module):
        out, _ = module(_inputs())
        return jnp.sum(out**2)

    grads = nnx.jit(nnx.grad(loss))(layer)
    for path, grad in nnx.to_flat_state(grads):
        assert bool(jnp.all(jnp.isfinite(grad.get_value()))), path
    for name in names:  # the initial memory is trained by the outer loop
        assert float(jnp.max(jnp.abs(grads["initial_weights"][name].get_value()))) > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_memory_stays_bounded_over_4096_tokens(dtype):
    layer = _layer(chunk_size=16, dtype=dtype)  # default init, the default chunk size
    x = jax.random.normal(jax.random.key(2), (1, 4096, WIDTH), jnp.float32)
    y, aux = nnx.jit(lambda module, inputs: module(inputs))(layer, x)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    # M_0 has per-head norm ~sqrt(fan_out) ~ 4-6; retention (α ≈ 0.018 at init) keeps the
    # momentum-driven updates from accumulating: a bounded memory stays within 10x of it.
    for key, value in aux.items():
        assert np.isfinite(float(value)) and float(value) < 60.0, (key, float(value))


def test_extend_equals_the_chunked_forward_token_by_token_and_in_pieces():
    layer = _layer(init_std=0.3)  # chunk_size 4, LENGTH 11: two full chunks and a partial one
    x = _inputs()
    full, _ = layer(x)
    cache, pieces = layer.init_cache(BATCH), []
    for start, stop in [(0, 5), (5, 6), (6, 7), (7, 11)]:
        y, cache = _extend(layer, x[:, start:stop], cache)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=TOL, rtol=TOL)
    assert int(cache["filled"]) == LENGTH % 4


def test_chunk_size_one_is_the_exact_token_rule():
    layer = _layer(init_std=0.3)
    chunk_one, _ = layer(_inputs(), chunk_size=1)
    exact = _layer(init_std=0.3, impl="reference")(_inputs())[0]
    chunked, _ = layer(_inputs())
    np.testing.assert_allclose(chunk_one, exact, atol=TOL, rtol=TOL)
    assert float(jnp.max(jnp.abs(chunked - exact))) > 1e-4  # chunk 4 approximates it


def test_gd_rule_without_short_conv_decodes_too():
    layer = _layer(MemorySpec(rule="gd"), conv_size=0)
    x = _inputs()
    full, _ = layer(x)
    cache, pieces = layer.init_cache(BATCH), []
    for t in range(LENGTH):
        y, cache = _extend(layer, x[:, t : t + 1], cache)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=TOL, rtol=TOL)


# Rows of two packed documents, 4 and 7 tokens: the second starts on the chunk grid of 4,
# where chunked packed rows equal the documents run alone
# (`tests/pallas_kernels/test_neural_memory_packing.py` has the other layouts).
DOCUMENTS = (4, 7)
SEGMENT_IDS = jnp.asarray(np.repeat(np.arange(2), DOCUMENTS)[None].repeat(BATCH, 0), jnp.int32)


def run_documents_alone(run, x):
    """run(x [B, n, D]) on each document, concatenated back to [B, T, D]."""
    bounds = np.cumsum([0, *DOCUMENTS])
    return jnp.concatenate([run(x[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)


@pytest.mark.parametrize(
    "spec",
    [MemorySpec(), pytest.param(MemorySpec(omega_window=3, rule="muon"), marks=pytest.mark.slow)],
    ids=["titans", "atlas"],
)
def test_packed_documents_equal_documents_run_alone(spec):
    """Values and parameter gradients: memory, momentum, Omega window and short convs all
    restart at a document start."""
    layer, x = _layer(spec, init_std=0.3), _inputs()
    probe = jax.random.normal(jax.random.key(7), x.shape)

    def packed_loss(layer):
        y, _ = layer(x, segment_ids=SEGMENT_IDS)
        return jnp.sum(y * probe), y

    def alone_loss(layer):
        y = run_documents_alone(lambda piece: layer(piece)[0], x)
        return jnp.sum(y * probe), y

    (_, packed), packed_grads = nnx.jit(nnx.value_and_grad(packed_loss, has_aux=True))(layer)
    (_, alone), alone_grads = nnx.jit(nnx.value_and_grad(alone_loss, has_aux=True))(layer)
    np.testing.assert_allclose(packed, alone, atol=TOL, rtol=TOL)
    unpacked, _ = nnx.jit(lambda layer: layer(x))(layer)
    assert float(jnp.max(jnp.abs(unpacked[:, 4:] - packed[:, 4:]))) > 100 * TOL  # it resets
    for (path, a), (_, e) in zip(nnx.to_flat_state(packed_grads), nnx.to_flat_state(alone_grads)):
        a, e = np.asarray(a.get_value()), np.asarray(e.get_value())
        scale = max(1.0, float(np.max(np.abs(e))))
        assert float(np.max(np.abs(a - e))) <= 1e-4 * scale, path


# ---- the ATLAS / Miras choices (layer side: inputs, feature map, decoding) ----------------

# Each new choice with the per-token inputs it needs; the Omega window (3) is shorter than a
# chunk (4) and crosses chunk boundaries; layer options beside the spec.
NEW_CHOICES = {
    "moneta": (MemorySpec(bias="lp", lp_p=3.0, retention="lq", lq_q=4.0, rule="gd"), {}),
    "yaad": (MemorySpec(bias="huber", rule="gd"), {}),
    "memora": (MemorySpec(retention="kl", rule="gd"), {}),
    "atlas": (MemorySpec(rule="muon", omega_window=3), {"feature_map": "polynomial"}),
    "omeganet": (
        MemorySpec(rule="gd", omega_window=3),
        {"feature_map": "polynomial", "feature_degree": 3},
    ),
}
# ATLAS's monomial φ_p: keys and queries of 16 + 136 = 152 features, the MLP memory 152 -> 32
# -> 16 with the degree-1 block as its residual (forward, gradients, decoding: ~30 s of CPU).
RUN_CHOICES = NEW_CHOICES | {
    "atlas_monomial": (MemorySpec(rule="muon", omega_window=3), {"feature_map": "monomial"}),
}


def test_titans_defaults_build_no_new_parameters():
    """The Titans layer keeps exactly its parameters (so its init and outputs are unchanged)."""
    names = {path[0] for path, _ in nnx.to_flat_state(nnx.state(_layer(), nnx.Param))}
    assert names == {
        "query", "key", "value", "query_conv", "key_conv", "value_conv",
        "step_size", "momentum", "decay", "initial_weights", "output",
    }  # fmt: skip
    inputs, _ = _layer().features(_inputs())
    assert set(inputs.named()) == {"q", "k", "v", "lr", "momentum", "log_decay"}


@pytest.mark.parametrize(
    "name",
    [  # the monomial map's own gradients are in test_feature_maps.py; its decode test runs here
        pytest.param(name, marks=pytest.mark.slow) if name == "atlas_monomial" else name
        for name in RUN_CHOICES
    ],
)
def test_new_choices_run_forward_and_backward(name):
    spec, options = RUN_CHOICES[name]
    layer = _layer(spec, init_std=0.3, **options)
    inputs, _ = layer.features(_inputs())
    assert set(inputs.extra) == {item.name for item in spec.extra_inputs}
    if "huber_delta" in inputs.extra:
        assert float(jnp.min(inputs.extra["huber_delta"])) > 0
    if "omega_gate" in inputs.extra:
        gates = inputs.extra["omega_gate"]
        assert float(jnp.min(gates)) >= 0 and float(jnp.max(gates)) <= 1

    def loss(module):  # one compilation for the forward and the backward
        out, _ = module(_inputs())
        return jnp.sum(out**2), out

    grads, y = nnx.jit(nnx.grad(loss, has_aux=True))(layer)
    assert y.shape == (BATCH, LENGTH, WIDTH) and bool(jnp.all(jnp.isfinite(y)))
    for path, grad in nnx.to_flat_state(grads):
        assert bool(jnp.all(jnp.isfinite(grad.get_value()))), path
    for part in ("huber_threshold", "omega_gate", "feature_map", "initial_weights"):
        if hasattr(layer, part) and getattr(layer, part) is not None:
            largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[part]))
            assert largest > 0, (name, part)


@pytest.mark.parametrize("name", NEW_CHOICES)
def test_new_choices_chunk_size_one_is_the_exact_token_rule(name):
    spec, options = NEW_CHOICES[name]
    layer = _layer(spec, init_std=0.3, **options)
    exact = _layer(spec, init_std=0.3, impl="reference", **options)(_inputs())[0]
    np.testing.assert_allclose(layer(_inputs(), chunk_size=1)[0], exact, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", RUN_CHOICES)
def test_new_choices_decode_in_pieces_and_single_tokens(name):
    spec, options = RUN_CHOICES[name]
    layer = _layer(spec, init_std=0.3, **options)
    x = _inputs()
    full, _ = layer(x)
    # A whole first chunk, single tokens into the second, then 4 tokens across the chunk
    # boundary at 8 (the Omega window reaches back over it); two compilations (T = 4, 1).
    cache, outputs, start = layer.init_cache(BATCH), [], 0
    for length in (4, 1, 1, 1, 4):
        y, cache = _extend(layer, x[:, start : start + length], cache)
        outputs.append(y)
        start += length
    np.testing.assert_allclose(jnp.concatenate(outputs, 1), full, atol=TOL, rtol=TOL)


def test_polynomial_degree_one_layer_equals_the_identity_map_layer():
    spec = MemorySpec(omega_window=2)
    plain = _layer(spec, init_std=0.3)
    mapped = _layer(spec, init_std=0.3, feature_map="polynomial", feature_degree=1)
    np.testing.assert_array_equal(mapped(_inputs())[0], plain(_inputs())[0])


def test_monomial_layer_shapes_and_degree_one_is_the_identity_map_layer():
    spec = MemorySpec(rule="muon", omega_window=2)
    layer = _layer(spec, init_std=0.3, feature_map="monomial")
    assert layer.key_dim == HEAD_DIM + HEAD_DIM * (HEAD_DIM + 1) // 2
    assert {name: w.shape for name, w in layer.initial_weights.items()} == {
        "W1": (HEADS, layer.key_dim, 2 * HEAD_DIM),
        "W2": (HEADS, 2 * HEAD_DIM, HEAD_DIM),
    }
    inputs, _ = layer.features(_inputs())
    assert inputs.q.shape == inputs.k.shape == (BATCH, LENGTH, HEADS, layer.key_dim)
    assert inputs.v.shape == (BATCH, LENGTH, HEADS, HEAD_DIM)
    cache = layer.init_cache(BATCH)
    assert cache["chunk"].k.shape[-1] == layer.key_dim and cache["chunk"].v.shape[-1] == HEAD_DIM
    # Degree 1, s_1 = 1: φ(x) = x, the same parameters drawn in the same order.
    plain = _layer(spec, init_std=0.3)
    mapped = _layer(spec, init_std=0.3, feature_map="monomial", feature_degree=1)
    np.testing.assert_array_equal(mapped(_inputs())[0], plain(_inputs())[0])


@pytest.mark.parametrize("feature_map", ["monomial", "polynomial"])
def test_bad_feature_degree_names_the_option(feature_map):
    for degree in (0, -1, 2.0):
        with pytest.raises(ValueError, match=f"{feature_map} feature map.*degree"):
            _layer(feature_map=feature_map, feature_degree=degree)
    with pytest.raises(ValueError, match="feature_map='cubic'"):
        _layer(feature_map="cubic")


def test_gates_start_at_their_biases_for_every_token():
    """By default θ, η, α (and the declared extras, e.g. Yaad's δ) are the same for every
    token at init -- the values `layers.neural_memory` documents -- and gate_init_std makes
    them depend on the token."""
    x = _inputs()
    yaad = MemorySpec(bias="huber", rule="gd")
    for spec in (DEFAULT_SPEC, yaad):
        layer = _layer(spec, gate_init_std=0.0)
        inputs, _ = layer.features(x)
        per_token = {"lr": inputs.lr, "log_decay": inputs.log_decay, **inputs.extra}
        if inputs.momentum is not None:
            per_token["momentum"] = inputs.momentum
        for name, value in per_token.items():
            np.testing.assert_array_equal(value, np.broadcast_to(value[:1, :1], value.shape), name)
        np.testing.assert_allclose(inputs.lr, layer.lr_max * 0.5)  # lr_max · sigmoid(0)
        np.testing.assert_allclose(inputs.log_decay, np.log1p(-jax.nn.sigmoid(-4.0)), rtol=1e-6)
        varied, _ = _layer(spec, gate_init_std=0.5).features(x)
        assert float(jnp.std(varied.lr)) > 1e-3 and float(jnp.std(varied.log_decay)) > 1e-3
    assert set(inputs.extra) == {"huber_delta"}
    default = NeuralMemory(WIDTH, num_heads=HEADS, head_dim=HEAD_DIM, spec=DEFAULT_SPEC,
                           rngs=nnx.Rngs(0))  # fmt: skip
    np.testing.assert_array_equal(default.decay.kernel[...], 0.0)


def test_default_lr_max_is_the_stability_edge_of_the_inner_step():
    """θ's cap is 2 / (L Σγ / (1 - η)) at init: L = fan_in of the MLP memory's last layer,
    Σγ = c / 2 for an Omega window of c tokens, 1 / (1 - η) = 2 with momentum (gated decay,
    l2 or Huber bias); 0.1 for the memories the argument does not cover; an explicit lr_max
    wins."""
    fan_in = 2 * HEAD_DIM  # depth 2, expansion 2: W2 is [2d, d]
    assert _layer().lr_max == 2.0 / (fan_in * 2)  # momentum (the Titans LMM)
    assert _layer(MemorySpec(depth=1)).lr_max == 2.0 / (HEAD_DIM * 2)
    assert _layer(MemorySpec(rule="gd", bias="huber_norm")).lr_max == 2.0 / fan_in  # Yaad
    assert _layer(MemorySpec(rule="gd", bias="huber")).lr_max == 2.0 / fan_in  # eq. 26's Yaad
    assert _layer(MemorySpec(rule="gd", omega_window=4)).lr_max == 2.0 / (fan_in * 2)  # OmegaNet
    for other in (
        MemorySpec(architecture="matrix"),
        MemorySpec(rule="muon"),
        MemorySpec(retention="kl"),
        MemorySpec(bias="dot_product"),
        MemorySpec(bias="lp", lp_p=1.0),  # a fixed-size step, as Sign(e)
        MemorySpec(bias="lp", lp_p=1.5),
    ):
        assert _layer(other).lr_max == 0.1, other
    assert _layer(lr_max=0.3).lr_max == 0.3


def test_default_lr_max_of_moneta_scales_the_edge_by_its_retention_and_bias():
    """Moneta (ℓ3 bias, ℓ4 retention): L times ||A_0||_4^2 (the W-step's gain on A, for
    A_0 ~ N(0, 1/d_in): sqrt(3 d_in d_out) / d_in) times the ℓ3 bias's curvature 2 E|e| =
    2 sqrt(2/π); p = 2 and q = 2 are the l2 memory's cap exactly."""
    fan_in = 2 * HEAD_DIM
    gd = MemorySpec(rule="gd")
    lq_gain = (3.0 * fan_in * HEAD_DIM) ** 0.5 / fan_in
    lp_curvature = 2.0 * (2.0 / np.pi) ** 0.5
    moneta = MemorySpec(rule="gd", bias="lp", lp_p=3.0, retention="lq", lq_q=4.0)
    np.testing.assert_allclose(_layer(moneta).lr_max, 2.0 / (fan_in * lq_gain * lp_curvature))
    lq_only = MemorySpec(rule="gd", retention="lq", lq_q=4.0)
    np.testing.assert_allclose(_layer(lq_only).lr_max, 2.0 / (fan_in * lq_gain))
    for same_as_l2 in (
        MemorySpec(rule="gd", bias="lp", lp_p=2.0),
        MemorySpec(rule="gd", retention="lq", lq_q=2.0),
    ):
        np.testing.assert_allclose(_layer(same_as_l2).lr_max, _layer(gd).lr_max)


def test_lq_step_gain_is_the_norm_of_the_drawn_initial_weights():
    """The cap's ||A_0||_q^(q-2) (an expectation) against that of the layer's drawn A_0, per
    head: within 10% at d_in d_out = 512 entries, q = 3 and 4 (at q = 6 the sixth moment of
    512 draws is itself 12% off)."""
    from layers.neural_memory_init import _lq_step_gain
    from pallas_kernels.neural_memory.choices_miras import lq_read_scale

    for q in (3.0, 4.0):
        spec = MemorySpec(rule="gd", retention="lq", lq_q=q)
        drawn = _layer(spec).initial_weights["W2"][...]  # [H, 2d, d]
        measured = 1.0 / lq_read_scale({"W2": drawn}, spec)["W2"][:, 0, 0]
        expected = _lq_step_gain(spec, drawn.shape[1:])
        np.testing.assert_allclose(measured, expected, rtol=0.1, err_msg=f"q={q}")
