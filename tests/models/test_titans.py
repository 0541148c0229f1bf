"""Titans blocks (`models.titans`): LMM, MAL, MAG, MAC inside the LM — shapes, annotations,
gradients, causality, persistent tokens, decoding against the full forward, bad options."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from errors import ConfigError, DataError

KINDS = ("lmm", "mal", "mag", "mac")
DECODING_KINDS = ("lmm", "mal", "mag", "mac")
BATCH, VOCAB, WIDTH, LENGTH = 2, 32, 32, 11
# float32: cached decoding and the full forward compute the same sums in another order
# (padding and masked keys contribute exact zeros), so logits of size ~5 agree to ~1e-6.
TOL = 1e-5


def _config(kind, **options):
    config = models.default_config()
    config.vocab_size, config.d_model, config.num_heads, config.num_layers = VOCAB, WIDTH, 2, 1
    config.block_pattern = (kind,)
    # Peaked attention and gates, so a wrong mask shows in the logits. MAC at 0.3 is too
    # ill-conditioned for a float32 comparison (a 1e-6 relative change of the embeddings
    # moves its logits by 5e-4: the memory's parameter-free LN of a small z amplifies
    # rounding); at 0.1 that sensitivity is 3e-6 with logits of size ~3.
    config.init_std = 0.1 if kind == "mac" else 0.3
    section = config[kind]
    section.chunk_size = 4  # LENGTH 11: full chunks and a partial one
    if "window" in section:
        section.window = 3  # shorter than LENGTH: the ring cache wraps
    if "segment_size" in section:
        section.segment_size = 4
    for key, value in options.items():
        section[key] = value
    return config


@functools.cache
def _model(kind, options=()):
    return models.build_model(_config(kind, **dict(options)), rngs=nnx.Rngs(0))


def random_tokens(length=LENGTH, seed=1):
    return jax.random.randint(jax.random.key(seed), (BATCH, length), 0, VOCAB, jnp.int32)


@nnx.jit
def logits_of(model, tokens):
    return model.logits(tokens)


@nnx.jit
def _extend(model, tokens, cache, positions):
    return model.extend(tokens, cache, positions=positions)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_annotations_gradients_and_metrics(kind):
    model = _model(kind)
    hidden, aux = model(random_tokens())
    assert hidden.shape == (BATCH, LENGTH, WIDTH) and bool(jnp.all(jnp.isfinite(hidden)))
    assert "layer_00/memory_norm/W1" in aux and float(aux["layer_00/memory_norm/W1"]) > 0

    params = nnx.state(model, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    for path, param in nnx.to_flat_state(params):
        axes = specs[path].get_value()
        assert len(axes) == param.get_value().ndim and any(axes), (path, axes)

    batch = {"inputs": random_tokens(), "targets": random_tokens(seed=2)}
    batch["mask"] = jnp.ones_like(batch["inputs"], jnp.float32)

    def loss(module):
        terms = module.loss_terms(batch)
        return terms["ce_sum"] / terms["count"]

    grads = nnx.jit(nnx.grad(loss))(model)
    for path, grad in nnx.to_flat_state(grads):
        assert bool(jnp.all(jnp.isfinite(grad.get_value()))), path
    block_grads = grads["blocks"][0]
    assert float(jnp.max(jnp.abs(block_grads["memory"]["initial_weights"]["W1"].get_value()))) > 0
    if kind in ("mag", "mac"):  # the persistent tokens reach the loss
        assert float(jnp.max(jnp.abs(block_grads["persistent"].get_value()))) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_do_not_depend_on_later_tokens(kind):
    """Causality, incl. MAC's retrieved tokens h_j and its per-token memory reads, and the
    padding of T = 11 to whole segments: changing tokens 6.. leaves logits 0..5 unchanged."""
    model = _model(kind)
    tokens = random_tokens()
    changed = tokens.at[:, 6:].set((tokens[:, 6:] + 5) % VOCAB)
    before, after = logits_of(model, tokens), logits_of(model, changed)
    np.testing.assert_allclose(before[:, :6], after[:, :6], atol=TOL, rtol=TOL)
    assert float(jnp.max(jnp.abs(before[:, 6:] - after[:, 6:]))) > 1e-3


def test_mac_memory_carries_information_across_segments():
    """With segment_size 4 the attention of tokens 8.. never sees tokens 0..3; only the
    memory (retrieval h and the gated read) can carry them."""
    model = _model("mac")
    tokens = random_tokens()
    changed = tokens.at[:, :4].set((tokens[:, :4] + 7) % VOCAB)
    difference = jnp.abs(logits_of(model, tokens)[:, 8:] - logits_of(model, changed)[:, 8:])
    assert float(jnp.max(difference)) > 1e-4


def decode(model, tokens, pieces, max_length=16):
    cache = model.init_cache(BATCH, max_length)
    start, outputs = 0, []
    for length in pieces:
        positions = jnp.broadcast_to(jnp.arange(start, start + length), (BATCH, length))
        logits, cache = _extend(model, tokens[:, start : start + length], cache, positions)
        outputs.append(logits)
        start += length
    return jnp.concatenate(outputs, axis=1)


@pytest.mark.parametrize("kind", DECODING_KINDS)
def test_decoding_equals_the_full_forward(kind):
    """Same chunk boundaries (0, 4, 8) in both, so decoding equals the chunked forward; a
    prefill of 5 crosses a chunk boundary (prefills at the default options: every kind in
    tests/models/test_generate.py)."""
    model = _model(kind)
    tokens = random_tokens()
    np.testing.assert_allclose(
        decode(model, tokens, (5, 1, 1, 4)), logits_of(model, tokens), atol=TOL, rtol=TOL
    )


def test_mac_decoding_with_chunks_that_straddle_segments():
    """chunk_size 3, segment_size 4: the forward restarts chunks at every segment, so the
    decoding cache must end a chunk at a segment's end as well as after 3 tokens."""
    model = _model("mac", (("chunk_size", 3),))
    tokens = random_tokens()
    np.testing.assert_allclose(
        decode(model, tokens, (5, 1, 1, 4)), logits_of(model, tokens), atol=TOL, rtol=TOL
    )


@pytest.mark.parametrize("write_stream", ["attention", "normed_residual"])
def test_mac_write_streams_decode_and_differ(write_stream):
    """write_stream "attention" trains the memory on y, "normed_residual" on
    RMSNorm(RMSNorm(x) + y), instead of RMSNorm(x) + y: decoding still equals the forward,
    and the memory (so the logits past the first segment) differ."""
    model = _model("mac", (("write_stream", write_stream),))
    tokens = random_tokens()
    logits = logits_of(model, tokens)
    np.testing.assert_allclose(decode(model, tokens, (5, 1, 1, 4)), logits, atol=TOL, rtol=TOL)
    assert float(jnp.max(jnp.abs(logits - logits_of(_model("mac"), tokens)))) > 1e-3


@pytest.mark.parametrize("kind", DECODING_KINDS)
def test_token_decoding_equals_the_exact_rule_forward(kind):
    """chunk_size 1: the forward is the exact token rule (Titans eqs. 9-14; held to the
    `impl="reference"` oracle in tests/layers/test_neural_memory_layer.py), and so is
    decoding one token at a time."""
    model = _model(kind, (("chunk_size", 1),))
    tokens = random_tokens()
    np.testing.assert_allclose(
        decode(model, tokens, (1,) * LENGTH), logits_of(model, tokens), atol=TOL, rtol=TOL
    )


@pytest.mark.parametrize(
    "kind, key, value, message",
    [
        ("lmm", "architecture", "tree", "model.lmm.architecture"),
        ("mag", "num_persistent", 0, "model.mag.num_persistent"),
        ("mac", "segment_size", 0, "model.mac.segment_size"),
        ("mac", "write_stream", "output", "model.mac.write_stream"),
        ("mal", "lr_max", -0.1, "model.mal.lr_max"),
        ("mal", "window", -1, "model.mal.window"),
    ],
)
def test_bad_options_name_their_key(kind, key, value, message):
    with pytest.raises(ConfigError, match=message):
        models.build_model(_config(kind, **{key: value}), rngs=nnx.Rngs(0))


# mag covers the memory, the sliding-window attention with persistent tokens and positions.
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("lmm", marks=pytest.mark.slow),
        pytest.param("mal", marks=pytest.mark.slow),
        "mag",
    ],
)
def test_packed_documents_equal_documents_run_alone(kind):
    """Documents of 4 and 7 tokens (the second on the chunk grid): memory, attention window,
    positions and persistent tokens all behave as if each document ran alone."""
    model, tokens = _model(kind), random_tokens()
    segment_ids = jnp.asarray(np.repeat([0, 1], [4, 7])[None].repeat(BATCH, 0), jnp.int32)
    packed, _ = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, segment_ids)
    alone = [nnx.jit(lambda m, t: m(t))(model, part)[0] for part in (tokens[:, :4], tokens[:, 4:])]
    np.testing.assert_allclose(packed, jnp.concatenate(alone, axis=1), atol=TOL, rtol=TOL)


def test_mac_refuses_packed_sequences():
    segment_ids = jnp.zeros((BATCH, LENGTH), jnp.int32)
    with pytest.raises(DataError, match="segment_ids: the mac block"):
        _model("mac")(random_tokens(), segment_ids=segment_ids)
