"""Token-by-token references for the deep-memory recurrence (`lax.scan`, float32 or wider).

The exact rule, one token at a time (Titans eqs. 9-14 in the Miras four-choice form):

    M~_t = exp(g_t) M_{t-1}                  retention first (as Gated DeltaNet / Miras)
    u_t  = grad_M l(M~_t; k_t, v_t)          gradient at the *retained* memory
    S_t  = eta_t S_{t-1} - theta_t u_t       (plain GD: S_t = -theta_t u_t)
    M_t  = M~_t + S_t
    o_t  = M_t(q_t)                          read after the update

Titans eq. 13-14 take the gradient at M_{t-1}; taking it at M~_t instead is what makes the
matrix / l2 / GD case exactly the gated delta rule S_t = a_t S_{t-1} + b_t k_t (v_t -
a_t S_{t-1}^T k_t)^T. Gradients here come from `jax.grad` of the inner loss, independently
of the hand-written backprop the chunked form uses.

`chunk_start_scan` is the oracle for the chunk-parallel form (Titans §3.2, eqs. 16-18): in a
chunk starting after token c0, every gradient is taken at the decayed chunk-start memory
gamma_i M_{c0}, gamma_i = exp(sum_{m=c0+1..i} g_m). With chunk_size 1 it is the exact rule.

Inputs: q, k [B, T, H, Dk]; v [B, T, H, Dv]; lr (theta), momentum (eta, or None for GD),
log_decay (g <= 0) [B, T, H]; state leaves [B, H, d_in, d_out].
"""

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory.choices import MemorySpec, NeuralMemoryState, at_least_float32


def memory_gradient(spec: MemorySpec, weights, key, value):
    """grad_M l(M; k, v) for one token per (batch, head): key [B, H, Dk], leaves [B, H, ...]."""
    architecture, bias = spec.memory_architecture, spec.attentional_bias

    def total_loss(w):
        # Each (b, h) weight only touches its own token, so the sum separates.
        prediction, _ = architecture.forward(w, key[..., None, :])
        return jnp.sum(bias.loss(prediction, value[..., None, :]))

    return jax.grad(total_loss)(weights)


def read(spec: MemorySpec, weights, query):
    """o = M(q) for one token: query [B, H, Dk] -> [B, H, Dv]."""
    output, _ = spec.memory_architecture.forward(weights, query[..., None, :])
    return output[..., 0, :]


def _update(spec, state, retained, gradient, lr, momentum):
    """S_t and M_t = M~_t + S_t from the retained memory and the gradient u_t."""
    new_momentum, update = spec.learning_rule.token_update(state.momentum, gradient, lr, momentum)
    weights = jax.tree.map(jnp.add, retained, update)
    return NeuralMemoryState(weights, new_momentum)


def step(spec: MemorySpec, state, query, key, value, lr, momentum, log_decay):
    """One token of the exact rule: per-token inputs [B, H, D] / [B, H] -> (o_t, state)."""
    retained = spec.retention_rule.retain(state.weights, log_decay)
    gradient = memory_gradient(spec, retained, key, value)
    state = _update(spec, state, retained, gradient, lr, momentum)
    return read(spec, state.weights, query), state


def _time_major(x):
    return None if x is None else jnp.moveaxis(at_least_float32(x), 1, 0)


def exact_scan(spec, q, k, v, lr, momentum, log_decay, initial_state):
    """The exact token rule over a sequence -> (o [B, T, H, Dv] in v's dtype, final state)."""

    def body(state, token):
        query, key, value, lr_t, momentum_t, log_decay_t = token
        output, state = step(spec, state, query, key, value, lr_t, momentum_t, log_decay_t)
        return state, output

    tokens = tuple(map(_time_major, (q, k, v, lr, momentum, log_decay)))
    final_state, outputs = jax.lax.scan(body, jax.tree.map(at_least_float32, initial_state), tokens)
    return jnp.moveaxis(outputs, 0, 1).astype(v.dtype), final_state


def chunk_start_scan(spec, q, k, v, lr, momentum, log_decay, initial_state, chunk_size):
    """Token by token, but gradients at gamma_i M_{c0} (Titans eqs. 16-18) -> (o, final)."""
    seq_len = q.shape[1]
    starts_chunk = jnp.arange(seq_len) % chunk_size == 0

    def body(carry, token):
        state, chunk_start_weights, gamma = carry
        starts, query, key, value, lr_t, momentum_t, log_decay_t = token
        chunk_start_weights = jax.tree.map(
            lambda start, now: jnp.where(starts, now, start), chunk_start_weights, state.weights
        )
        # gamma_i M_{c0}: the gated decay (the only retention so far) scales every weight.
        gamma = jnp.where(starts, 1.0, gamma) * jnp.exp(log_decay_t)
        decayed_start = jax.tree.map(lambda w: gamma[..., None, None] * w, chunk_start_weights)
        gradient = memory_gradient(spec, decayed_start, key, value)
        retained = spec.retention_rule.retain(state.weights, log_decay_t)
        state = _update(spec, state, retained, gradient, lr_t, momentum_t)
        return (state, chunk_start_weights, gamma), read(spec, state.weights, query)

    state = jax.tree.map(at_least_float32, initial_state)
    gamma = jnp.ones_like(at_least_float32(lr[:, 0]))
    tokens = (starts_chunk,) + tuple(map(_time_major, (q, k, v, lr, momentum, log_decay)))
    (final_state, _, _), outputs = jax.lax.scan(body, (state, state.weights, gamma), tokens)
    return jnp.moveaxis(outputs, 0, 1).astype(v.dtype), final_state
