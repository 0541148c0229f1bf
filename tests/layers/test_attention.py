"""Attention: mask semantics, the softmax core against a loop reference, RoPE, the module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import (
    Attention,
    attention_mask,
    dot_product_attention,
    sliding_window_attention,
)
from layers.rope import apply_rope

# float32 throughout; different summation orders of the same math agree to ~1e-6.
TOL = 1e-5


def _loop_reference(query, key, value, window, segments):
    """softmax attention, one (batch, head, query) at a time over the allowed keys, float64."""
    query, key, value = (np.asarray(a, np.float64) for a in (query, key, value))
    batch, length, num_heads, head_dim = query.shape
    group = num_heads // key.shape[2]
    out = np.zeros_like(query)
    for b in range(batch):
        for h in range(num_heads):
            for i in range(length):
                allowed = [
                    j
                    for j in range(i + 1)
                    if (window == 0 or i - j < window) and segments[b, i] == segments[b, j]
                ]
                scores = np.array([query[b, i, h] @ key[b, j, h // group] for j in allowed])
                weights = np.exp((scores - scores.max()) / np.sqrt(head_dim))
                weights /= weights.sum()
                out[b, i, h] = sum(w * value[b, j, h // group] for w, j in zip(weights, allowed))
    return out


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_core_matches_loop_reference(window, num_kv_heads):
    keys = jax.random.split(jax.random.key(0), 3)
    batch, length, num_heads, head_dim = 2, 9, 4, 8
    query = jax.random.normal(keys[0], (batch, length, num_heads, head_dim))
    key = jax.random.normal(keys[1], (batch, length, num_kv_heads, head_dim))
    value = jax.random.normal(keys[2], (batch, length, num_kv_heads, head_dim))
    segments = np.array([[1] * 4 + [2] * 5, [1] * 9])
    index = jnp.arange(length)
    mask = attention_mask(
        index, index, window=window, query_segments=segments, key_segments=segments
    )
    out = dot_product_attention(query, key, value, mask)
    expected = _loop_reference(query, key, value, window, segments)
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("window, length", [(3, 10), (4, 8), (2, 11)])
def test_blocked_sliding_window_equals_the_loop_reference(window, length):
    """Blocks of `window` queries over the previous and current block give the same result
    as the full masked attention, also across packed segments and with GQA, with a partial
    last block (10 = 3 + 3 + 3 + 1), and one that ends on a block boundary (8 = 4 + 4)."""
    keys = jax.random.split(jax.random.key(1), 3)
    batch, num_heads, num_kv_heads, head_dim = 2, 4, 2, 8
    query = jax.random.normal(keys[0], (batch, length, num_heads, head_dim))
    key = jax.random.normal(keys[1], (batch, length, num_kv_heads, head_dim))
    value = jax.random.normal(keys[2], (batch, length, num_kv_heads, head_dim))
    segments = np.array([[1] * 4 + [2] * (length - 4), [1] * length])
    out = sliding_window_attention(query, key, value, window=window, segment_ids=segments)
    expected = _loop_reference(query, key, value, window, segments)
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=TOL)

    # Keys every query sees in front (Titans' persistent tokens): as full attention over
    # [prefix ‖ keys] with the prefix always visible.
    prefix_key, prefix_value = (
        jax.random.normal(k, (batch, 3, num_kv_heads, head_dim)) for k in jax.random.split(keys[0])
    )
    index = jnp.arange(length)
    window_mask = attention_mask(index, index, window=window)
    full_mask = jnp.concatenate([jnp.ones((1, length, 3), bool), window_mask], axis=-1)
    expected = dot_product_attention(
        query,
        jnp.concatenate([prefix_key, key], axis=1),
        jnp.concatenate([prefix_value, value], axis=1),
        full_mask,
    )
    out = sliding_window_attention(
        query, key, value, window=window, prefix_key=prefix_key, prefix_value=prefix_value
    )
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=TOL)

    def loss(fn, query, key, value):
        return jnp.sum(jnp.sin(fn(query, key, value)))

    mask = window_mask
    full = jax.grad(
        lambda *a: loss(lambda q, k, v: dot_product_attention(q, k, v, mask), *a), (0, 1, 2)
    )(query, key, value)
    blocked = jax.grad(
        lambda *a: loss(lambda q, k, v: sliding_window_attention(q, k, v, window=window), *a),
        (0, 1, 2),
    )(query, key, value)
    for got, want in zip(blocked, full, strict=True):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def test_mask_semantics():
    index = jnp.arange(5)
    mask = np.asarray(attention_mask(index, index, window=2)[0])
    # window=2: a query sees itself and one token back.
    expected = np.eye(5, dtype=bool) | np.eye(5, k=-1, dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(
        np.asarray(attention_mask(index, index)[0]), np.tril(np.ones((5, 5), bool))
    )


def test_rope_depends_on_relative_position_only():
    keys = jax.random.split(jax.random.key(1))
    query = jax.random.normal(keys[0], (1, 1, 2, 16))
    key = jax.random.normal(keys[1], (1, 1, 2, 16))

    def score(query_position, key_position):
        rotated_q = apply_rope(query, jnp.full((1, 1), query_position), 10000.0)
        rotated_k = apply_rope(key, jnp.full((1, 1), key_position), 10000.0)
        return jnp.sum(rotated_q * rotated_k, axis=-1)

    # Same offset m - n = 5 at different absolute positions: same score.
    np.testing.assert_allclose(score(7, 2), score(105, 100), atol=1e-4)
    np.testing.assert_allclose(score(7, 2), score(5, 0), atol=1e-4)
    # A different offset changes it (the test could not pass with RoPE switched off).
    assert np.abs(np.asarray(score(7, 2) - score(7, 5))).max() > 1e-2
    # Rotation preserves norms; position 0 is the identity.
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rope(query, jnp.full((1, 1), 37), 10000.0)),
        jnp.linalg.norm(query),
        rtol=1e-5,
    )
    np.testing.assert_allclose(apply_rope(query, jnp.zeros((1, 1), int), 10000.0), query)


def _attention(window=0, num_kv_heads=2, seed=0):
    return Attention(
        16,
        num_heads=4,
        head_dim=8,
        num_kv_heads=num_kv_heads,
        window=window,
        rope_theta=10000.0,
        init_std=0.3,
        out_init_std=0.3,
        rngs=nnx.Rngs(seed),
    )


@nnx.jit
def _run(layer, x, positions, segment_ids=None):
    return layer(x, positions=positions, segment_ids=segment_ids)


def _positions(batch, length):
    return jnp.broadcast_to(jnp.arange(length), (batch, length))


def test_causal_future_tokens_do_not_change_the_past():
    layer = _attention()
    x = jax.random.normal(jax.random.key(2), (2, 12, 16))
    changed = x.at[:, 7:].set(jax.random.normal(jax.random.key(3), (2, 5, 16)))
    out, out_changed = (_run(layer, a, _positions(2, 12)) for a in (x, changed))
    np.testing.assert_allclose(out[:, :7], out_changed[:, :7], atol=TOL)
    assert np.abs(np.asarray(out[:, 7:] - out_changed[:, 7:])).max() > 1e-3


def test_sliding_window_ignores_tokens_beyond_the_window():
    window, length = 4, 12
    layer = _attention(window=window)
    x = jax.random.normal(jax.random.key(4), (1, length, 16))
    # Change token 3: outputs 3..6 (within 4 tokens of it) may change, 7.. must not.
    changed = x.at[:, 3].add(1.0)
    out, out_changed = (_run(layer, a, _positions(1, length)) for a in (x, changed))
    difference = np.abs(np.asarray(out - out_changed)).max(axis=(0, 2))
    assert np.all(difference[:3] < TOL) and np.all(difference[7:] < TOL)
    assert np.all(difference[3 : 3 + window] > 1e-4)


def test_packed_segments_equal_separate_runs():
    layer = _attention(num_kv_heads=1)
    lengths = (5, 7)
    pieces = [jax.random.normal(jax.random.key(5 + i), (1, n, 16)) for i, n in enumerate(lengths)]
    separate = [_run(layer, p, _positions(1, p.shape[1])) for p in pieces]
    packed = jnp.concatenate(pieces, axis=1)
    segment_ids = jnp.array([[1] * lengths[0] + [2] * lengths[1]])
    positions = jnp.array([list(range(lengths[0])) + list(range(lengths[1]))])
    out = _run(layer, packed, positions, segment_ids)
    np.testing.assert_allclose(out, jnp.concatenate(separate, axis=1), atol=TOL)
