"""Token-by-token references for the deep-memory recurrence (`lax.scan`, float32 or wider).

The exact rule, one token at a time (Titans eqs. 9-14 in the Miras four-choice form, with
the Omega rule of ATLAS eq. 9):

    M~_t = exp(g_t) M_{t-1}                  retention first (as Gated DeltaNet / Miras)
    P_t  = M~_t (gated_decay) or W_{t-1} = effective(M_{t-1}) (lq, kl: Miras eqs. 24, 27)
    u_t  = grad_M sum_{i=t-c+1..t} gamma_i l(P_t; k_i, v_i)     (c = 1, gamma = 1: l_t)
    S_t, U_t = rule(S_{t-1}, u_t)            gd: U = -theta u; momentum: S = eta S - theta u,
                                             U = S; muon: S = eta S - u, U = theta NS(S)
    M_t  = after_update(M~_t + U_t)          (kl: log_softmax; otherwise the identity)
    o_t  = effective(M_t)(q_t)               read after the update

M_t is what the state stores (weights; lq's accumulator; kl's log-probabilities). Titans
eqs. 13-14 take the gradient at M_{t-1}; taking it at M~_t instead is what makes the
matrix / l2 / GD case exactly the gated delta rule S_t = a_t S_{t-1} + b_t k_t (v_t -
a_t S_{t-1}^T k_t)^T. The Omega window's tokens before the sequence start are absent
(zeros with gamma 0, see `NeuralMemoryState.window`). Gradients here come from `jax.grad`
of the inner loss, independently of the hand-written backprop the chunked form uses.

`chunk_start_scan` is the oracle for the chunk-parallel form (Titans §3.2, eqs. 16-18): in a
chunk starting after token c0, every gradient of token t -- all c terms of its Omega window,
including those of tokens before the chunk -- is taken at one point fixed by the chunk
start: gated_decay: gamma_t M_{c0}, gamma_t = exp(sum_{m=c0+1..t} g_m) (the chunk-start
memory decayed to token t); lq, kl: W_{c0} = effective(M_{c0}). Everything else (rule,
retention, read) is exact. With chunk_size 1 it is the exact rule. (Except what the spec
asks to freeze at the chunk start too: lq with `lq_normaliser="chunk_start"` reads token t
as A_t / ||A_{c0}||_q^(q-2), Miras §5.4's parallel form; kl with `kl_chunk_form="lag_token"`
runs `lag_token_scan`, Memora's parallel form. `exact_scan` keeps eqs. 24 and 27.)

Inputs: one `MemoryInputs` (q, k [B, T, H, Dk]; v [B, T, H, Dv]; lr (theta), momentum (eta,
or None for GD), log_decay (g <= 0) and the spec's declared extras (Huber's huber_delta,
the Omega gate gamma in [0, 1], absent meaning ones) [B, T, H]); state leaves
[B, H, d_in, d_out].
"""

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory.choices import (
    MemorySpec,
    NeuralMemoryState,
    at_least_float32,
    gated_decay_retain,
)
from pallas_kernels.neural_memory.choices_miras import (
    kl_logits_from_weights,
    window_tokens,
    with_pair_gates,
)
from pallas_kernels.neural_memory.chunked_lag_token import PACKED_ROWS_ERROR
from pallas_kernels.neural_memory.memory_inputs import MemoryInputs
from pallas_kernels.neural_memory.segments import document_starts, reset_state, where_rows


def window_gradient(spec: MemorySpec, weights, keys, values, bias_inputs=None, gates=None):
    """grad_M sum_n gates_n l(M; keys_n, values_n): keys [B, H, n, Dk], values [B, H, n, Dv],
    bias_inputs {name: [B, H, n]} (the inputs the bias declares), gates [B, H, n] or None;
    leaves [B, H, ...]."""
    architecture, bias = spec.memory_architecture, spec.attentional_bias

    def total_loss(w):
        # Each (b, h) weight only touches its own tokens, so the sum separates.
        prediction, _ = architecture.forward(w, keys)
        losses = bias.loss(prediction, values, **(bias_inputs or {}))
        return jnp.sum(losses if gates is None else gates * losses)

    return jax.grad(total_loss)(weights)


def memory_gradient(spec: MemorySpec, weights, key, value, bias_inputs=None):
    """grad_M l(M; k, v) for one token per (batch, head): key [B, H, Dk], bias_inputs
    {name: [B, H]}; leaves [B, H, ...]."""
    per_token = {name: x[..., None] for name, x in (bias_inputs or {}).items()}
    return window_gradient(spec, weights, key[..., None, :], value[..., None, :], per_token)


def read(spec: MemorySpec, weights, query):
    """o = M(q) for one token: query [B, H, Dk] -> [B, H, Dv] (`weights` as the network
    uses them, i.e. already `spec.effective_weights` of the state)."""
    output, _ = spec.memory_architecture.forward(weights, query[..., None, :])
    return output[..., 0, :]


def omega_window_tokens(spec, window, token: MemoryInputs):
    """Token t's Omega window, oldest first: (keys [B, H, c, Dk], values, bias inputs
    {name: [B, H, c]}, gates [B, H, c] or None when absent), and the window to carry to
    token t + 1."""
    bias_names = [item.name for item in spec.attentional_bias.inputs]
    gate = token.extra.get("omega_gate")
    if spec.omega_window == 1:
        bias_inputs = {name: token.extra[name][..., None] for name in bias_names}
        gates = None if gate is None else gate[..., None]
        return (token.k[..., None, :], token.v[..., None, :], bias_inputs, gates), None
    axis = {"k": -2, "v": -2}  # per-token scalars: the last axis
    tokens = window_tokens(spec, token)
    current = {name: jnp.expand_dims(x, axis.get(name, -1)) for name, x in tokens.items()}
    full = {
        name: jnp.concatenate([window[name], current[name]], axis.get(name, -1)) for name in window
    }
    carried = {
        name: jax.lax.slice_in_dim(x, 1, None, axis=axis.get(name, -1) % x.ndim)
        for name, x in full.items()
    }
    bias_inputs = {name: full[name] for name in bias_names}
    gates = with_pair_gates(spec, full["gate"], token)  # empty window's slots: 0
    return (full["k"], full["v"], bias_inputs, gates), carried


def _update(spec, state, retained, gradient, lr, momentum, window):
    """S_t and the stored M_t = after_update(M~_t + U_t) from the gradient u_t."""
    new_momentum, update = spec.learning_rule.token_update(state.momentum, gradient, lr, momentum)
    weights = spec.retention_rule.after_update(jax.tree.map(jnp.add, retained, update))
    return NeuralMemoryState(weights, new_momentum, window)


def _token(spec, state, point, token: MemoryInputs, read_scale=None):
    """One token given the point P_t where its gradients are taken -> (o_t, state).
    read_scale: None (read effective(M_t)), or per-leaf factors s: read s M_t."""
    retained = spec.retention_rule.retain(state.weights, token.log_decay)
    if point is None:  # the exact rule
        point = retained
        if not spec.retention_rule.gradient_at_retained:
            point = spec.effective_weights(state.weights)
    window_inputs, window = omega_window_tokens(spec, state.window, token)
    gradient = window_gradient(spec, point, *window_inputs)
    state = _update(spec, state, retained, gradient, token.lr, token.momentum, window)
    if read_scale is None:
        weights = spec.effective_weights(state.weights)
    else:
        weights = jax.tree.map(lambda s, m: s * m, read_scale, state.weights)
    return read(spec, weights, token.q), state


def step(spec, state, token: MemoryInputs):
    """One token of the exact rule: per-token inputs [B, H, D] / [B, H] -> (o_t, state)."""
    return _token(spec, state, None, token)


def _time_major(inputs: MemoryInputs) -> MemoryInputs:
    return inputs.map(lambda name, x: jnp.moveaxis(at_least_float32(x), 1, 0))


def _document_starts(segment_ids, inputs: MemoryInputs):
    """[T, B] bool: token t opens a document (all False without segment_ids)."""
    if segment_ids is None:
        return jnp.zeros(inputs.lr.shape[1::-1], bool)
    return jnp.moveaxis(document_starts(segment_ids), 1, 0)


def exact_scan(spec, inputs: MemoryInputs, initial_state, segment_ids=None):
    """The exact token rule over a sequence -> (o [B, T, H, Dv] in v's dtype, final state).

    segment_ids [B, T] (packed rows): where the id changes, the state becomes
    `segments.reset_state(initial_state)` before the token."""
    state = jax.tree.map(at_least_float32, initial_state)
    restart = reset_state(spec, state)

    def body(state, scanned):
        starts, token = scanned
        if segment_ids is not None:
            state = where_rows(starts, restart, state)
        output, state = _token(spec, state, None, token)
        return state, output

    scanned = (_document_starts(segment_ids, inputs), _time_major(inputs))
    final_state, outputs = jax.lax.scan(body, state, scanned)
    return jnp.moveaxis(outputs, 0, 1).astype(inputs.v.dtype), final_state


def chunk_start_scan(spec, inputs: MemoryInputs, initial_state, chunk_size, observe=None,
                     segment_ids=None):  # fmt: skip
    """Token by token, but every gradient at the chunk-start point (see the module doc:
    gamma_t M_{c0} for gated_decay, W_{c0} for lq / kl) -> (o, final state).

    observe: optional (t, state before token t, state after it, token t's `MemoryInputs`
    [B, H, ...]) -> pytree; given, it runs at every token and (o, final state, observations
    stacked on a leading T axis) is returned (`evals.memory_behaviour` traces retrieval
    errors with it). segment_ids [B, T] (packed rows): where the id changes, the state
    becomes `segments.reset_state(initial_state)` and a chunk starts."""
    if spec.lag_token_chunk:
        if segment_ids is not None:
            raise ValueError(PACKED_ROWS_ERROR)
        return lag_token_scan(spec, inputs, initial_state, chunk_size, observe)
    seq_len = inputs.q.shape[1]
    on_grid = jnp.arange(seq_len) % chunk_size == 0
    retention = spec.retention_rule
    state = jax.tree.map(at_least_float32, initial_state)
    restart = reset_state(spec, state)

    def body(carry, scanned):
        state, chunk_start_weights, gamma = carry
        grid, document, index, token = scanned
        if segment_ids is None:  # the chunk grid alone: one flag for the whole batch
            starts = jnp.broadcast_to(grid, gamma.shape[:1])
        else:
            state = where_rows(document, restart, state)
            starts = grid | document  # [B]
        chunk_start_weights = where_rows(starts, state.weights, chunk_start_weights)
        gamma = jnp.where(starts[:, None], 1.0, gamma) * jnp.exp(token.log_decay)
        if retention.gradient_at_retained:  # gamma_t M_{c0}
            point = jax.tree.map(lambda w: gamma[..., None, None] * w, chunk_start_weights)
        else:  # W_{c0}
            point = spec.effective_weights(chunk_start_weights)
        read_scale = None  # lq with lq_normaliser="chunk_start": read s(A_{c0}) A_t
        if spec.chunk_read_scale is not None:
            read_scale = spec.chunk_read_scale(chunk_start_weights, spec)
        output, new_state = _token(spec, state, point, token, read_scale)
        observed = None if observe is None else observe(index, state, new_state, token)
        return (new_state, chunk_start_weights, gamma), (output, observed)

    gamma = jnp.ones_like(at_least_float32(inputs.lr[:, 0]))
    documents = _document_starts(segment_ids, inputs)
    scanned = (on_grid, documents, jnp.arange(seq_len), _time_major(inputs))
    (final_state, _, _), (outputs, observed) = jax.lax.scan(
        body, (state, state.weights, gamma), scanned
    )
    outputs = jnp.moveaxis(outputs, 0, 1).astype(inputs.v.dtype)
    return (outputs, final_state) if observe is None else (outputs, final_state, observed)


def lag_token_scan(spec, inputs: MemoryInputs, initial_state, chunk_size, observe=None):
    """Memora's parallel form (`chunked_lag_token`) token by token -> (o, final state), and
    observations as `chunk_start_scan`'s when `observe` is given.

    A chunk's first token is eq. 27 (`step`), giving W_1; every later token t of the chunk
    steps the weights themselves, W_t = exp(g_t) W_{t-1} - theta_t grad l(W_1; x_t) (jax.grad
    at W_1), and reads W_t; after the chunk's last token (or the sequence's) W goes back to
    log-probabilities (`kl_logits_from_weights`). Carry: (state with the stored
    log-probabilities, W_t, W_1). `observe` sees the states as the weights each token reads
    (weight space: W_{t-1} before, W_t after; the effective weights at a lag token), since
    inside a chunk no log-probabilities exist."""
    seq_len = inputs.q.shape[1]
    state = jax.tree.map(at_least_float32, initial_state)

    def lag(state, weights, lag_weights, token):
        output, state = _token(spec, state, None, token)
        lag_weights = spec.effective_weights(state.weights)
        return output, state, lag_weights, lag_weights

    def additive(state, weights, lag_weights, token):
        window_inputs, window = omega_window_tokens(spec, state.window, token)
        gradient = window_gradient(spec, lag_weights, *window_inputs)
        retained = gated_decay_retain(weights, token.log_decay)
        _, update = spec.learning_rule.token_update(None, gradient, token.lr, None)
        weights = jax.tree.map(jnp.add, retained, update)
        output = read(spec, weights, token.q)
        return output, state._replace(window=window), weights, lag_weights

    def body(carry, scanned):
        index, token = scanned
        is_lag = index % chunk_size == 0
        output, state, weights, lag_weights = jax.lax.cond(is_lag, lag, additive, *carry, token)
        chunk_end = (index % chunk_size == chunk_size - 1) | (index == seq_len - 1)
        returned = kl_logits_from_weights(weights, spec)
        logits = jax.tree.map(
            lambda r, p: jnp.where(chunk_end & ~is_lag, r, p), returned, state.weights
        )
        observed = None
        if observe is not None:  # before: W_{t-1}, or the effective weights at a lag token
            before = jax.tree.map(
                lambda e, w: jnp.where(is_lag, e, w),
                spec.effective_weights(carry[0].weights),
                carry[1],
            )
            observed = observe(
                index,
                NeuralMemoryState(before, None, carry[0].window),
                NeuralMemoryState(weights, None, state.window),
                token,
            )
        return (state._replace(weights=logits), weights, lag_weights), (output, observed)

    weights = spec.effective_weights(state.weights)
    scanned = (jnp.arange(seq_len), _time_major(inputs))
    (final_state, _, _), (outputs, observed) = jax.lax.scan(
        body, (state, weights, weights), scanned
    )
    outputs = jnp.moveaxis(outputs, 0, 1).astype(inputs.v.dtype)
    return (outputs, final_state) if observe is None else (outputs, final_state, observed)
