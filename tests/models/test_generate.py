"""Decoding: per-block caches against the full forward, sampling filters, generate()."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from errors import ConfigError
from models import registry
from models.generate import (
    generate,
    greedy_tokens,
    sample_logits,
    stream,
    top_k_filter,
    top_p_filter,
)

BATCH, VOCAB, WIDTH = 2, 32, 32
# float32 throughout: cached decoding and the full forward compute the same sums in another
# order (masked keys contribute exact zeros), so logits of size ~5 agree to ~1e-6.
TOL = 1e-5


def _config(pattern, **overrides):
    """Tiny model config; an override "swa__window" sets config.swa.window."""
    config = models.default_config()
    config.vocab_size = VOCAB
    config.d_model = WIDTH
    config.num_heads = 2
    config.num_layers = 2
    config.block_pattern = tuple(pattern)
    config.swa.window = 4
    # Larger than the training default, so attention is far from uniform and logits are
    # peaked: a wrong mask or a stale cache entry changes the outputs visibly.
    config.init_std = 0.3
    for key, value in overrides.items():
        section, _, name = key.rpartition("__")
        (config[section] if section else config)[name] = value
    return config


@functools.cache
def _cached_model(pattern, overrides):
    return models.build_model(_config(pattern, **dict(overrides)), rngs=nnx.Rngs(0))


def _model(pattern, **overrides):
    """A tiny model, built once per (pattern, overrides): tests only read it."""
    model = _cached_model(tuple(pattern), tuple(sorted(overrides.items())))
    for kind, block in zip(model.block_kinds, model.blocks, strict=True):
        if not hasattr(block, "init_cache"):
            pytest.skip(f"block kind {kind!r} has no init_cache/extend (no decoding support)")
    return model


def _tokens(length, seed=1):
    return jax.random.randint(jax.random.key(seed), (BATCH, length), 0, VOCAB, jnp.int32)


@nnx.jit
def _full_logits(model, tokens):
    return model.logits(tokens)


@nnx.jit
def _extend(model, tokens, cache, positions):
    return model.extend(tokens, cache, positions=positions)


def _logits_by_chunks(model, tokens, chunk_lengths, max_length=None):
    """Feed `tokens` through extend in consecutive chunks; concatenated logits [B, T, V]."""
    assert sum(chunk_lengths) == tokens.shape[1]
    cache = model.init_cache(BATCH, max_length or tokens.shape[1])
    start, outputs = 0, []
    for length in chunk_lengths:
        positions = jnp.broadcast_to(jnp.arange(start, start + length), (BATCH, length))
        logits, cache = _extend(model, tokens[:, start : start + length], cache, positions)
        outputs.append(logits)
        start += length
    return jnp.concatenate(outputs, axis=1)


def _assert_close(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, atol=TOL, rtol=TOL)


# ---- every registered block kind ----------------------------------------------------------

# Both tests use one single-layer model, sequence length and cache size, so compilations are
# shared (chaining caches across layers is covered by the mixed-pattern tests below); the
# cache is larger than the sequence: unused slots must stay invisible.
KIND_LENGTH, KIND_CACHE = 11, 16
# Memora at init_std 0.3 is too ill-conditioned for a float32 comparison: a 1e-6 relative
# change of the embeddings moves its logits by 1.3e-4 (Yaad's by 2e-5), so the chunked
# forward and the token-by-token decoding, two float32 orders of the same math, differ by
# ~7e-5; at 0.1 that sensitivity is 1e-5 (Yaad 4e-6). Its algebra is checked in float64 in
# `tests/evals/test_memory_behaviour.py`. MAC and Moneta likewise (measured 2026-12-01, max
# logit change from a 1e-6 relative change of the embeddings): MAC 3.2e-4 at 0.3 (its
# segment attention over retrieved memory amplifies; the test failed on an Intel Xeon) and
# 2.5e-6 at 0.1, as `tests/models/test_titans.py` uses (with the residual write stream,
# the default since 2026-12-02: 3.9e-5 at 0.3, 3.0e-6 at 0.1); Moneta 5.6e-5 at 0.3, 7.7e-6
# at 0.1.
KIND_OVERRIDES = {kind: {"init_std": 0.1} for kind in ("mac", "memora", "moneta")}
# Memory caching: segments short enough that the 11 tokens cross two segment ends (lmm_mc's
# segment_size must be a multiple of its chunk_size).
KIND_OVERRIDES["gdn_mc"] = {"gdn_mc__segment_size": 4}
KIND_OVERRIDES["lmm_mc"] = {"lmm_mc__segment_size": 4, "lmm_mc__chunk_size": 2}


def _kind_model(kind):
    return _model((kind,), num_layers=1, **KIND_OVERRIDES.get(kind, {}))


@pytest.mark.parametrize("kind", registry.registered_blocks())
def test_token_by_token_extend_equals_full_forward(kind):
    model = _kind_model(kind)
    tokens = _tokens(KIND_LENGTH)
    chunked = _logits_by_chunks(model, tokens, [1] * KIND_LENGTH, max_length=KIND_CACHE)
    _assert_close(chunked, _full_logits(model, tokens))


@pytest.mark.parametrize("kind", registry.registered_blocks())
def test_prefill_then_single_steps_equals_full_forward(kind):
    model = _kind_model(kind)
    tokens = _tokens(KIND_LENGTH)
    chunked = _logits_by_chunks(model, tokens, [7, 1, 1, 1, 1], max_length=KIND_CACHE)
    _assert_close(chunked, _full_logits(model, tokens))


# ---- attention specifics: sliding window, GQA, mixed patterns -----------------------------


def _mixed_model():
    """attention / swa (window 3) / attention, all with one shared key-value head (GQA)."""
    return _model(
        ("attention", "swa"),
        num_layers=3,
        swa__window=3,
        swa__num_kv_heads=1,
        attention__num_kv_heads=1,
    )


def test_mixed_pattern_gqa_and_swa_chunks_longer_than_the_window():
    model = _mixed_model()
    assert model.blocks[1].attention.num_kv_heads == 1
    tokens = _tokens(14)
    # A prefill of 5 > window on a fresh cache, then a chunk of 4 > window after the ring
    # buffer has wrapped (the attend-then-write path), single steps, and a chunk of 3.
    chunked = _logits_by_chunks(model, tokens, [5, 4, 1, 1, 3])
    _assert_close(chunked, _full_logits(model, tokens))


def test_swa_cache_is_a_ring_of_window_size():
    model = _mixed_model()
    cache = model.init_cache(BATCH, 14)
    head_dim = WIDTH // 2
    assert cache[0]["key"].shape == (BATCH, 14, 1, head_dim)
    assert cache[1]["key"].shape == (BATCH, 3, 1, head_dim)
    assert model.init_cache(BATCH, 2)[1]["key"].shape == (BATCH, 2, 1, head_dim)
    positions = jnp.broadcast_to(jnp.arange(5), (BATCH, 5))
    _, cache = _extend(model, _tokens(5), cache, positions)
    # Slot p mod 3 holds position p: the last three tokens 2, 3, 4 in slots 2, 0, 1.
    np.testing.assert_array_equal(cache[1]["key_positions"], [[3, 4, 2]] * BATCH)
    np.testing.assert_array_equal(cache[0]["key_positions"], [list(range(5)) + [-1] * 9] * BATCH)


# ---- sampling ------------------------------------------------------------------------------


def _random_logits(seed=0, shape=(4, VOCAB)):
    return 3.0 * jax.random.normal(jax.random.key(seed), shape)


def test_greedy_is_argmax():
    logits = _random_logits()
    expected = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(greedy_tokens(logits), expected)
    sampled = sample_logits(logits, jax.random.key(0), greedy=True)
    assert sampled.dtype == jnp.int32
    np.testing.assert_array_equal(sampled, expected)


def test_top_k_never_samples_outside_the_top_k():
    logits = _random_logits(shape=(3, VOCAB))
    top_k = 3
    keys = jax.random.split(jax.random.key(1), 2000)
    samples = jax.jit(jax.vmap(lambda key: sample_logits(logits, key, top_k=top_k)))(keys)
    allowed = np.argsort(-np.asarray(logits), axis=-1)[:, :top_k]
    for row in range(logits.shape[0]):
        drawn = set(np.asarray(samples[:, row]).tolist())
        assert drawn == set(allowed[row].tolist())  # only the top k, and each of them
    kept = np.isfinite(np.asarray(top_k_filter(logits, top_k)))
    np.testing.assert_array_equal(kept.sum(-1), [top_k] * 3)


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    # Hand-checked: probabilities 0.05, 0.5, 0.15, 0.3 (token 1 most likely, then 3, 2, 0).
    logits = jnp.log(jnp.array([0.05, 0.5, 0.15, 0.3]))
    cases = {
        0.4: [1],  # 0.5 >= 0.4 already
        0.75: [1, 3],  # 0.5 < 0.75, 0.5 + 0.3 = 0.8 >= 0.75
        0.9: [1, 2, 3],  # 0.8 < 0.9, 0.95 >= 0.9
        0.99: [0, 1, 2, 3],
        1.0: [0, 1, 2, 3],
    }
    for top_p, expected in cases.items():
        kept = np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, top_p))))
        np.testing.assert_array_equal(kept, expected, err_msg=f"top_p={top_p}")
    keys = jax.random.split(jax.random.key(2), 1000)
    samples = jax.jit(jax.vmap(lambda key: sample_logits(logits, key, top_p=0.75)))(keys)
    assert set(np.asarray(samples).tolist()) == {1, 3}
    # Renormalised over the nucleus: token 1 has probability 0.5 / 0.8 = 0.625 (±5 sigma).
    np.testing.assert_allclose(np.mean(np.asarray(samples) == 1), 0.625, atol=0.08)


def test_low_temperature_approaches_greedy():
    logits = _random_logits(shape=(4, VOCAB))
    keys = jax.random.split(jax.random.key(3), 500)

    def agreement(temperature):
        draw = jax.vmap(lambda key, t: sample_logits(logits, key, temperature=t), (0, None))
        samples = jax.jit(draw)(keys, temperature)
        return np.mean(np.asarray(samples) == np.asarray(greedy_tokens(logits)))

    assert agreement(1e-3) == 1.0
    assert agreement(0.3) > agreement(1.0)
    assert agreement(1.0) < 1.0  # at temperature 1 the draws do differ from argmax


def test_bad_sampling_settings_raise_config_errors():
    logits = _random_logits()
    with pytest.raises(ConfigError, match="temperature"):
        sample_logits(logits, jax.random.key(0), temperature=0.0)
    with pytest.raises(ConfigError, match="top_p"):
        sample_logits(logits, jax.random.key(0), top_p=0.0)
    with pytest.raises(ConfigError, match="top_k"):
        sample_logits(logits, jax.random.key(0), top_k=-1)


# ---- generate ------------------------------------------------------------------------------

PROMPT_LENGTH, NEW_TOKENS = 5, 7


def _greedy_by_full_forwards(model, prompt, max_new_tokens):
    """The obvious reference: a full forward per new token. The forward is causal, so it
    runs on a fixed-length buffer (one compilation) and reads the logits at the last filled
    position."""
    length = prompt.shape[1]
    tokens = jnp.pad(prompt, ((0, 0), (0, max_new_tokens)))
    for position in range(length, length + max_new_tokens):
        logits = _full_logits(model, tokens)[:, position - 1]
        tokens = tokens.at[:, position].set(jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return tokens


def test_greedy_generate_equals_repeated_argmax_of_full_forwards():
    model = _mixed_model()
    prompt = _tokens(PROMPT_LENGTH)
    out = generate(model, prompt, max_new_tokens=NEW_TOKENS, rng=jax.random.key(0), greedy=True)
    assert out.shape == (BATCH, PROMPT_LENGTH + NEW_TOKENS) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out, _greedy_by_full_forwards(model, prompt, NEW_TOKENS))


def test_sampled_generate_shape_prompt_and_reproducibility():
    model = _mixed_model()
    prompt = _tokens(PROMPT_LENGTH)

    def run(seed, **settings):
        return generate(
            model, prompt, max_new_tokens=NEW_TOKENS, rng=jax.random.key(seed), **settings
        )

    sampled = run(5, temperature=0.8, top_k=10, top_p=0.9)
    assert sampled.shape == (BATCH, PROMPT_LENGTH + NEW_TOKENS) and sampled.dtype == jnp.int32
    np.testing.assert_array_equal(sampled[:, :PROMPT_LENGTH], prompt)
    assert np.all((np.asarray(sampled) >= 0) & (np.asarray(sampled) < VOCAB))
    np.testing.assert_array_equal(sampled, run(5, temperature=0.8, top_k=10, top_p=0.9))
    assert not np.array_equal(sampled, run(6, temperature=0.8, top_k=10, top_p=0.9))
    # top_k = 1 leaves one token to draw: sampling becomes greedy decoding.
    np.testing.assert_array_equal(run(7, top_k=1), run(0, greedy=True))
    no_new = generate(model, prompt, max_new_tokens=0, rng=jax.random.key(0))
    np.testing.assert_array_equal(no_new, prompt)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, prompt, max_new_tokens=-1, rng=jax.random.key(0))


def test_stream_yields_the_tokens_generate_appends():
    """Same keys for the same steps: streamed tokens are generate's, sampled and greedy."""
    model = _mixed_model()
    prompt = _tokens(PROMPT_LENGTH)
    for settings in (dict(temperature=0.8, top_k=10, top_p=0.9), dict(greedy=True)):
        rng = jax.random.key(3)
        whole = generate(model, prompt, max_new_tokens=NEW_TOKENS, rng=rng, **settings)
        streamed = list(stream(model, prompt, max_new_tokens=NEW_TOKENS, rng=rng, **settings))
        assert len(streamed) == NEW_TOKENS and streamed[0].shape == (BATCH,)
        np.testing.assert_array_equal(jnp.stack(streamed, axis=1), whole[:, PROMPT_LENGTH:])
    assert list(stream(model, prompt, max_new_tokens=0, rng=jax.random.key(0))) == []
