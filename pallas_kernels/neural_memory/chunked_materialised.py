"""Chunk step for the choices whose memory is not linear in the stored state: lq and kl
retention (Miras eqs. 24, 27: the weights are a non-linear map of an accumulator / of
log-probabilities) and the muon rule (ATLAS: Newton-Schulz of the momentum). Any other
choice runs here too (the tests hold it to the linear form on Titans' choices).

  1. Every gradient of the chunk (with its Omega window) at the chunk-start point --
     gamma_t M_{c0} for gated_decay, W_{c0} = effective(M_{c0}) for lq / kl -- by one
     forward and hand backprop over the chunk (`chunked_gradients`), summed into per-token
     gradients u_s, materialised as [B, H, b, d_in, d_out] leaves.
  2. Every token's stored state, all at once (`token_states`). What is *stored* follows a
     linear recurrence in every choice -- retention keeps exp(g_t) x stored and the rule adds
     its update -- so the b states are [b, b] coefficient matrices applied to the b updates.
     The non-linear parts are per-token maps of linear quantities: muon's update
     theta_t NS(S_t) of a momentum linear in the gradients (one batch of b Newton-Schulz
     maps), lq's and kl's effective weights of the stored state (step 3).
  3. Every token is read with its own effective weights W_t (the b per-token weights are
     materialised, [B, H, b, d_in, d_out] per layer).

kl's log_softmax after each update (`Retention.after_update`) shifts every column of the
stored log-probabilities by a constant, which softmax ignores; so inside a chunk the
unnormalised sums are kept, and normalised once, at the state handed to the next chunk.
Same weights as normalising every token; the sums stay bounded as the chunk start is
normalised and a chunk adds only b updates.

This is the exact chunk form of lq and kl: only the gradient point is frozen at the chunk
start -- the approximation every chunked choice makes (Titans §3.2) -- and the lq map / the
softmax run exactly at every token, so chunk_size 1 is the exact token rule. Miras §5.4's own
parallel forms of Moneta / Memora (the normalisation only at chunk ends; softmax and log
only at a "lag" token at the chunk start, additive updates after it) are linear chunks:
`MemorySpec.lq_normaliser="chunk_start"` and `kl_chunk_form="lag_token"` (`chunked`,
`chunked_lag_token`).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory.choices import NeuralMemoryState, momentum_transfer
from pallas_kernels.neural_memory.chunked_gradients import (
    gradient_factors,
    per_entry,
    per_token_gradients,
    window_entries,
)
from pallas_kernels.neural_memory.memory_inputs import MemoryInputs
from pallas_kernels.neural_memory.segments import mask_window, restart_momentum, restart_transfer


def chunk_step(spec, state: NeuralMemoryState, chunk: MemoryInputs, last, segments=None):
    """One chunk, any choices (as `chunked.chunk_step`, with its `segments`) -> (state after
    `last`, o [B, H, b, Dv])."""
    architecture, retention = spec.memory_architecture, spec.retention_rule
    names = architecture.layer_names

    pieces = None
    entries = window_entries(spec, state.window, chunk, last)
    start_decay, transfer = retention.chunk_transfer(chunk.log_decay)
    if segments is not None:
        pieces, restart_weights = segments
        start_decay, transfer = restart_transfer(pieces, chunk.log_decay, transfer)
        if chunk.momentum is not None:
            chunk = chunk.replace(momentum=restart_momentum(pieces, chunk.momentum))
        entries = mask_window(spec, pieces, entries, last)

    def gradients_at(weights):
        if retention.gradient_at_retained:  # gamma_t M_{c0}: each weight scaled per token
            point, scale = weights, per_entry(spec, start_decay)[..., None]
        else:  # W_{c0}
            point, scale = spec.effective_weights(weights), 1.0
        return per_token_gradients(spec, gradient_factors(spec, point, entries, scale), names)

    gradients = gradients_at(state.weights)
    base = jax.tree.map(lambda w: w[..., None, :, :], state.weights)  # [B, H, 1, m, n]
    if pieces is not None:  # a fresh piece's tokens continue M_0
        fresh = pieces.fresh[..., None, None]
        gradients = jax.tree.map(
            lambda a, b: jnp.where(fresh, a, b), gradients_at(restart_weights), gradients
        )
        base = jax.tree.map(
            lambda m0, w: jnp.where(fresh, m0[..., None, :, :], w), restart_weights, base
        )

    stored_per_token, momentum_per_token = token_states(
        spec, state, gradients, chunk, start_decay, transfer, base
    )

    def at_last(leaf):  # the state after token `last` (rows past it saw only padding)
        return jax.lax.dynamic_index_in_dim(leaf, last, 2, keepdims=False)

    stored, momentum = jax.tree.map(at_last, (stored_per_token, momentum_per_token))
    weights = spec.effective_weights(stored_per_token)

    def read_layer(index, layer_input):  # token t through its own W_t
        return jnp.einsum("...tm,...tmn->...tn", layer_input, weights[names[index]])

    output, _ = architecture.run_layers(chunk.q, read_layer)
    new_state = NeuralMemoryState(retention.after_update(stored), momentum, entries.carried)
    return new_state, output


def _apply(coefficients, leaves):
    """sum_i C[t, i] x_i: coefficients [B, H, b, b], leaves [B, H, b, m, n] -> same shape."""
    return jnp.einsum("...ti,...imn->...tmn", coefficients, leaves)


def _scaled(factors, leaf):
    """factors [B, H, b] times a chunk-start leaf [B, H, m, n] (or per token [B, H, b, m, n]
    / [B, H, 1, m, n]) -> [B, H, b, m, n]."""
    if leaf.ndim == factors.ndim + 1:
        leaf = leaf[..., None, :, :]
    return factors[..., None, None] * leaf


def token_states(spec, state, gradients, chunk, start_decay, transfer, base):
    """(stored, momentum) after every token of the chunk, leaves [B, H, b, m, n] (momentum
    None for GD); stored before kl's normalisation (see the module doc). Rows past the
    chunk's last real token have seen padding; no row before them has (lower triangular).

      gd / momentum: M_t = Gamma_t M0 + sum_{i<=t} C[t, i] w_i + D_t S0, w_i = -theta_i u_i,
        S_t = E_t S0 + sum_{i<=t} P[t, i] w_i (`ChunkCoefficients`).
      muon: S_t = E_t S0 - sum_{i<=t} P[t, i] u_i, U_t = theta_t NS(S_t) for all t as one
        batch, M_t = Gamma_t M0 + sum_{i<=t} A[t, i] U_i.

    start_decay [B, H, b] and transfer [B, H, b, b] are the retention's Gamma and A (per
    piece in a packed row, `segments`); base: M0 as leaves [B, H, 1 or b, m, n] (per token
    in a packed row: M_0 in a fresh piece).
    """
    rule, lr = spec.learning_rule, chunk.lr

    if rule.chunk_coefficients is not None:
        coefficients = rule.chunk_coefficients(transfer, chunk.momentum)
        steps = jax.tree.map(lambda u: -lr[..., None, None] * u, gradients)
        stored = jax.tree.map(
            lambda m0, w: _scaled(start_decay, m0) + _apply(coefficients.update, w),
            base,
            steps,
        )
        if not rule.uses_momentum:
            return stored, None
        stored = jax.tree.map(
            lambda m, s0: m + _scaled(coefficients.carried, s0), stored, state.momentum
        )
        momentum = jax.tree.map(
            lambda s0, w: (
                _scaled(coefficients.momentum_carried, s0) + _apply(coefficients.momentum_update, w)
            ),
            state.momentum,
            steps,
        )
        return stored, momentum

    momentum_update, momentum_carried = momentum_transfer(chunk.momentum)
    momentum = jax.tree.map(
        lambda s0, u: _scaled(momentum_carried, s0) - _apply(momentum_update, u),
        state.momentum,
        gradients,
    )
    updates = rule.update_from_momentum(momentum, lr)
    stored = jax.tree.map(
        lambda m0, update: _scaled(start_decay, m0) + _apply(transfer, update),
        base,
        updates,
    )
    return stored, momentum
