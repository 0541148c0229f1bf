"""Memora's chunk in the paper's parallel form (Miras §5.4, eqs. 30-32):
`MemorySpec.kl_chunk_form="lag_token"`.

Eq. 27 takes softmax and log at every token, so a chunk of it materialises every token's
weights (`chunked_materialised`, ~0.3x the Titans LMM's training throughput). The paper
trains Memora with a linearised chunk instead:

  1. the chunk's first ("lag") token takes eq. 27 exactly from the chunk-start state:
     P_1 = log_softmax(alpha_1 P_{c0} - eta_1 grad l(W_{c0}; x_1)), W_1 = c exp(P_1);
  2. the rest of the chunk skips softmax and log, gradient descent on the weights themselves
     with every gradient at W_1: W_t = alpha_t W_{t-1} - eta_t grad l(W_1; x_t). That is the
     gated-decay GD chunk of `chunked` started from W_1 (with the lag token made neutral: no
     step, no decay, so it reads W_1), at the Titans LMM's cost;
  3. the chunk-end weights return to log-probabilities, log_softmax(log max(W / c, floor))
     (`choices_miras.kl_logits_from_weights`): additive steps can leave an entry at or below
     zero, which has no logarithm; it is held at the probability floor.

With chunk size 1 every token is a lag token: eq. 27 exactly. The token references
(`reference.exact_scan`, `step`) keep eq. 27; `reference.chunk_start_scan` runs this form
token by token (its oracle), and decoding re-runs partial chunks through it. Packed rows
(segment_ids) are not supported: a document starting mid-chunk would need a second lag
token.
"""

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory.choices import NeuralMemoryState
from pallas_kernels.neural_memory.choices_miras import kl_logits_from_weights
from pallas_kernels.neural_memory.chunked_gradients import (
    gradient_factors,
    per_token_gradients,
    window_entries,
)

PACKED_ROWS_ERROR = (
    "segment_ids (packed rows) with kl_chunk_form='lag_token': not supported (a document "
    "opening mid-chunk has no lag token); use kl_chunk_form='exact' or unpacked rows "
    "(data.document_resets=False)"
)


def weight_space_spec(spec):
    """Step 2's choices: the same memory and bias, gated decay on the weights themselves."""
    return dataclasses.replace(spec, retention="gated_decay", kl_chunk_form="exact")


def lag_token_state(spec, state, lag):
    """Step 1: eq. 27 for the lag token (`lag`: the chunk's first token, inputs [B, H, 1, ...])
    -> its stored log-probabilities P_1."""
    names = spec.memory_architecture.layer_names
    entries = window_entries(spec, state.window, lag, 0)
    factors = gradient_factors(spec, spec.effective_weights(state.weights), entries)
    gradients = jax.tree.map(lambda u: u[:, :, 0], per_token_gradients(spec, factors, names))
    retained = spec.retention_rule.retain(state.weights, lag.log_decay[..., 0])
    _, update = spec.learning_rule.token_update(None, gradients, lag.lr[..., 0], None)
    return spec.retention_rule.after_update(jax.tree.map(jnp.add, retained, update))


def chunk_step(spec, state: NeuralMemoryState, chunk, last, linear_step):
    """One chunk (as `chunked.chunk_step`, no segments) -> (state after `last`, o [B, H, b, Dv]).
    linear_step: `chunked._linear_chunk_step`."""
    lag_logits = lag_token_state(spec, state, chunk.map(lambda name, x: x[:, :, :1]))
    lag_weights = spec.effective_weights(lag_logits)
    neutral = chunk.replace(
        lr=chunk.lr.at[..., 0].set(0.0), log_decay=chunk.log_decay.at[..., 0].set(0.0)
    )
    start = NeuralMemoryState(lag_weights, None, state.window)
    end, output = linear_step(weight_space_spec(spec), start, neutral, last, None, True)
    # A chunk of one real token ends at P_1 itself (chunk size 1: eq. 27 exactly).
    logits = jax.tree.map(
        lambda p1, p: jnp.where(last == 0, p1, p),
        lag_logits,
        kl_logits_from_weights(end.weights, spec),
    )
    return NeuralMemoryState(logits, None, end.window), output
