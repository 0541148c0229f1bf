"""Chunked cross-entropy: same values and gradients as the plain loss, bounded activations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.losses import cross_entropy_terms

# float32: chunked and plain sum the same per-token terms in a different order; relative
# differences of the sums are ~1e-7, gradients are the same per-token expressions.
RTOL, ATOL = 1e-5, 1e-6
BATCH, LENGTH, WIDTH, VOCAB = 2, 24, 16, 64


def _inputs(seed=0, length=LENGTH):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (BATCH, length, WIDTH))
    kernel = jax.random.normal(keys[1], (WIDTH, VOCAB)) * 0.5
    targets = jax.random.randint(keys[2], (BATCH, length), 0, VOCAB)
    mask = jax.random.bernoulli(keys[3], 0.7, (BATCH, length))
    return hidden, kernel, targets, mask


def test_plain_loss_matches_optax():
    hidden, kernel, targets, mask = _inputs()
    ce_sum, correct = cross_entropy_terms(hidden, kernel, targets, mask)
    logits = hidden @ kernel
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(ce_sum, jnp.sum(per_token * mask), rtol=RTOL)
    np.testing.assert_allclose(correct, jnp.sum((logits.argmax(-1) == targets) * mask))


@pytest.mark.parametrize("length,chunk_size", [(24, 8), (24, 6), (23, 8), (24, 24)])
def test_chunked_equals_plain_values_and_gradients(length, chunk_size):
    hidden, kernel, targets, mask = _inputs(seed=1, length=length)

    def loss(hidden, kernel, chunk):
        ce_sum, correct = cross_entropy_terms(hidden, kernel, targets, mask, chunk_size=chunk)
        return ce_sum, correct

    (plain, plain_correct), plain_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        hidden, kernel, 0
    )
    (chunked, chunked_correct), chunked_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        hidden, kernel, chunk_size
    )
    np.testing.assert_allclose(chunked, plain, rtol=RTOL)
    assert chunked_correct == plain_correct
    for got, expected in zip(chunked_grads, plain_grads):
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert np.abs(np.asarray(plain_grads[0])).max() > 1e-3  # gradients are not trivially 0


def _largest_intermediate(closed_jaxpr) -> int:
    """Element count of the largest value any equation produces, nested jaxprs included."""

    def walk(jaxpr):
        largest = 0
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for item in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        largest = max(largest, walk(inner))
        return largest

    return walk(closed_jaxpr.jaxpr)


def test_chunked_never_builds_full_logits():
    batch, length, width, vocab, chunk_size = 2, 64, 8, 512, 16
    hidden = jnp.ones((batch, length, width))
    kernel = jnp.ones((width, vocab))
    targets = jnp.zeros((batch, length), jnp.int32)
    mask = jnp.ones((batch, length))

    def grads(chunk):
        loss = lambda h, k: cross_entropy_terms(h, k, targets, mask, chunk_size=chunk)[0]  # noqa: E731
        return jax.value_and_grad(loss, (0, 1))

    # The jaxpr of forward + backward: nothing larger than one chunk's logits ...
    chunked = _largest_intermediate(jax.make_jaxpr(grads(chunk_size))(hidden, kernel))
    assert chunked == batch * chunk_size * vocab
    # ... while the plain loss does hold [B, T, V] (so the check can fail).
    assert _largest_intermediate(jax.make_jaxpr(grads(0))(hidden, kernel)) == batch * length * vocab

    # What XLA allocates agrees: the compiled chunked step needs less scratch memory than
    # the full float32 logits alone, the plain one more.
    full_logits_bytes = batch * length * vocab * 4
    temp = {}
    for chunk in (0, chunk_size):
        analysis = jax.jit(grads(chunk)).lower(hidden, kernel).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        temp[chunk] = analysis.temp_size_in_bytes
    assert temp[chunk_size] < full_logits_bytes <= temp[0]
