"""Chunk step for the choices that are not linear in the memory: lq and kl retention (Miras
eqs. 24, 27: the weights are a non-linear map of an accumulator / log-probabilities) and the
muon rule (ATLAS: Newton-Schulz of the momentum). Any other choice runs here too (the tests
hold it to the linear form on Titans' choices).

  1. The expensive part, in parallel: every gradient of the chunk (with its Omega window) at
     the chunk-start point -- gamma_t M_{c0} for gated_decay, W_{c0} = effective(M_{c0}) for
     lq / kl -- by one forward and hand backprop over the chunk (`chunked_gradients`), summed
     into per-token gradients u_s, materialised as [B, H, b, d_in, d_out] leaves.
  2. A cheap per-token pass (`lax.scan` over the b tokens) runs the exact retention and rule
     on those gradients: elementwise updates, plus the k Newton-Schulz matmuls of muon. No
     memory network is evaluated in it.
  3. Every token is read with its own effective weights W_t (the b per-token weights are
     materialised, [B, H, b, d_in, d_out] per layer).

Departures from Miras §5.4 (its parallel training of Moneta / Memora): the paper applies
Moneta's normalisation only at chunk ends and linearises Memora inside a chunk (softmax and
log only at a "lag" token at the chunk start, additive updates after it); here only the
gradient point is frozen at the chunk start -- the approximation every chunked choice makes
(Titans §3.2) -- and the lq map / the log-space softmax run exactly at every token, so
chunk_size 1 is the exact token rule and the chunk form is held to `reference.
chunk_start_scan`.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory.choices import NeuralMemoryState
from pallas_kernels.neural_memory.chunked_gradients import (
    gradient_factors,
    per_entry,
    per_token_gradients,
    window_entries,
)


def chunk_step(spec, state: NeuralMemoryState, chunk: dict, last):
    """One chunk, any choices (as `chunked.chunk_step`) -> (state after `last`, o [B, H, b, Dv])."""
    architecture, retention = spec.memory_architecture, spec.retention_rule
    rule = spec.learning_rule
    names = architecture.layer_names
    log_decay = chunk["g"]

    entries = window_entries(spec, state.window, chunk, last)
    if retention.gradient_at_retained:  # gamma_t M_{c0}: each weight scaled per token
        point = state.weights
        scale = per_entry(spec, jnp.exp(jnp.cumsum(log_decay, axis=-1)))[..., None]
    else:  # W_{c0}
        point, scale = spec.effective_weights(state.weights), 1.0
    factors = gradient_factors(spec, point, entries, scale)
    gradients = per_token_gradients(spec, factors, names)

    def token_step(carry, token):
        stored, momentum = carry
        gradient, lr, eta, g, index = token
        retained = retention.retain(stored, g)
        new_momentum, update = rule.token_update(momentum, gradient, lr, eta)
        new_stored = retention.after_update(jax.tree.map(jnp.add, retained, update))
        # Tokens after `last` (padding) leave the carried state alone; their outputs are
        # discarded by the caller.
        keep = index <= last
        stored = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_stored, stored)
        momentum = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_momentum, momentum)
        return (stored, momentum), spec.effective_weights(new_stored)

    chunk_size = log_decay.shape[-1]
    tokens = (
        jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), gradients),
        jnp.moveaxis(chunk["lr"], -1, 0),
        None if chunk.get("eta") is None else jnp.moveaxis(chunk["eta"], -1, 0),
        jnp.moveaxis(log_decay, -1, 0),
        jnp.arange(chunk_size),
    )
    (stored, momentum), weights = jax.lax.scan(token_step, (state.weights, state.momentum), tokens)
    weights = jax.tree.map(lambda w: jnp.moveaxis(w, 0, 2), weights)  # [B, H, b, m, n]

    def read_layer(index, layer_input):  # token t through its own W_t
        return jnp.einsum("...tm,...tmn->...tn", layer_input, weights[names[index]])

    output, _ = architecture.run_layers(chunk["q"], read_layer)
    return NeuralMemoryState(stored, momentum, entries.carried), output
