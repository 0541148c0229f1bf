"""Chunk-parallel deep-memory recurrence in plain JAX (Titans §3.2, eqs. 16-18).

Within a chunk of b tokens starting after token c0, every gradient is taken at the
chunk-start point (gamma_i M_{c0} for gated decay; W_{c0} for lq / kl), the rule
`reference.chunk_start_scan` runs token by token. All the chunk's gradients come at once
(`chunked_gradients`, with the Omega window of ATLAS eq. 9). Then:

Linear choices (gated_decay retention, or lq read at its chunk-start norm; gd / momentum
rule; `MemorySpec.linear_in_chunk`): the chunk is linear in its inputs, so
  1. retention and learning rule give, per (batch, head), the coefficients of
     M_t = Gamma_t M_{c0} + sum_{i<=t} C[t, i] (-theta_i u_i) + D_t S_{c0} (`ChunkCoefficients`);
  2. every token is read with its own M_t without materialising b weight copies: layer by
     layer, x W_{l,t} = Gamma_t x W_{l,c0} + sum_e C[t,s(e)] (-theta_s(e)) (x . a_{l,e})
     delta_{l,e} + D_t x S_{l,c0} -- an attention-like masked matmul over the b*c entries;
  3. the chunk-end state from the same coefficients at the chunk's last token.
With lq's `lq_normaliser="chunk_start"` the stored accumulator is what steps 1-3 carry,
every gradient is taken at W_{c0} = s A_{c0} and token t reads s A_t (s = 1 / ||A_{c0}||_q^(q-2)
per layer: a per-layer factor on step 2's output).
Other choices (lq, kl, muon): `chunked_materialised`, a cheap per-token pass over
materialised per-token gradients; Memora's parallel form (kl with kl_chunk_form
"lag_token"): `chunked_lag_token`, one exact token and then this linear form.

`lax.scan` runs over the chunks. T not a multiple of b is padded at the end (zero q/k/v/
theta/g, eta = 1, each declared input at its `TokenInput.pad`: finite, so nothing NaN
leaks), and the last
chunk's state is read at its last real token instead of its end. Padded tokens cannot simply
be made neutral: with momentum no token leaves the state unchanged (M_t = M~_t + S_t moves M
whenever S != 0, and eta = 0 would wipe S). Rows up to the last real token never see the
padding, as every coefficient matrix is lower triangular. Everything is float32 inside
(float64 if given float64 under jax x64, which the tests use to check the algebra).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory import chunked_lag_token, chunked_materialised
from pallas_kernels.neural_memory.choices import MemorySpec, NeuralMemoryState, at_least_float32
from pallas_kernels.neural_memory.chunked_gradients import (
    gradient_factors,
    per_entry,
    window_entries,
)
from pallas_kernels.neural_memory.memory_inputs import MemoryInputs, pad_values
from pallas_kernels.neural_memory.segments import (
    chunk_pieces,
    document_starts,
    mask_window,
    reset_state,
    restart_momentum,
    restart_transfer,
    where_rows,
)


def _outer_sum(coefficients, inputs, deltas):
    """sum_i c_i a_i^T delta_i: coefficients [..., b], inputs [..., b, m], deltas [..., b, n]."""
    return jnp.einsum("...i,...im,...in->...mn", coefficients, inputs, deltas)


def chunk_step(spec: MemorySpec, state: NeuralMemoryState, chunk: MemoryInputs, last,
               segments=None):  # fmt: skip
    """One chunk -> (state after token `last`, o [B, H, b, Dv]).

    state leaves [B, H, m, n]; chunk: heads-major inputs (q, k, v [B, H, b, D]; the per-token
    scalars [B, H, b], log_decay present); `last`: index of the chunk's last real token (an
    int or int32 scalar). Padding: `memory_inputs.pad_values`. segments: None, or (the
    chunk's `segments.Pieces`, the weights M_0 a document starts from) for packed rows.
    """
    if spec.lag_token_chunk:
        return chunked_lag_token.chunk_step(spec, state, chunk, last, _linear_chunk_step)
    if spec.linear_in_chunk:
        return _linear_chunk_step(spec, state, chunk, last, segments)
    return chunked_materialised.chunk_step(spec, state, chunk, last, segments)


def _linear_chunk_step(spec, state, chunk, last, segments, undecayed_point=False):
    """Steps 1-3 of the module doc (gated_decay or chunk-start-normalised lq; gd or
    momentum). undecayed_point: gated_decay's gradients at M_{c0} itself, not gamma_t M_{c0}
    (Memora's lag-token chunk, `chunked_lag_token`)."""
    query, lr, eta, log_decay = chunk.q, chunk.lr, chunk.momentum, chunk.log_decay
    architecture = spec.memory_architecture
    names = architecture.layer_names
    weights, momentum = state.weights, state.momentum
    uses_momentum = spec.learning_rule.uses_momentum

    start_decay, transfer = spec.retention_rule.chunk_transfer(log_decay)
    entries = window_entries(spec, state.window, chunk, last)
    if segments is not None:
        pieces, restart_weights = segments
        start_decay, transfer = restart_transfer(pieces, log_decay, transfer)
        eta = None if eta is None else restart_momentum(pieces, eta)
        entries = mask_window(spec, pieces, entries, last)
    coefficients = spec.learning_rule.chunk_coefficients(transfer, eta)
    gamma = start_decay[..., None]  # [B, H, b, 1]: Gamma_t, also gamma_i for the gradients

    read_scale = spec.chunk_read_scale  # lq at its chunk-start norm: W_t = s A_t
    if read_scale is None:  # gradients at gamma_t M_{c0} (or M_{c0})
        scale = 1.0 if undecayed_point else per_entry(spec, start_decay)[..., None]

        def gradients_at(start_weights):
            return gradient_factors(spec, start_weights, entries, scale=scale)
    else:  # at W_{c0} = s A_{c0}

        def gradients_at(start_weights):
            return gradient_factors(spec, spec.effective_weights(start_weights), entries)

    factors = gradients_at(weights)
    if segments is not None:  # a fresh piece's gradients are taken at M_0's point
        fresh = per_entry(spec, pieces.fresh)[..., None]
        restarted = gradients_at(restart_weights)
        factors = jax.tree.map(lambda a, b: jnp.where(fresh, a, b), restarted, factors)
    token_scale = None  # per layer [B, H, 1 or b, 1]: the scale token t reads A_t with
    if read_scale is not None:
        token_scale = read_scale(weights, spec)
        if segments is not None:  # a fresh piece reads with M_0's scale
            token_scale = jax.tree.map(
                lambda m0, s: jnp.where(pieces.fresh[..., None], m0, s),
                read_scale(restart_weights, spec),
                token_scale,
            )

    # Coefficient of the outer product a_e^T delta_e in W_t: C[t, s(e)] * (-theta_s(e)).
    update_weight = per_entry(spec, coefficients.update * (-lr)[..., None, :])

    def read_layer(index, layer_input):
        name = names[index]
        inputs, deltas = factors[index]
        scores = (layer_input @ jnp.swapaxes(inputs, -1, -2)) * update_weight  # [B, H, b, bc]
        base = layer_input @ weights[name]
        if segments is not None:
            base = jnp.where(pieces.fresh[..., None], layer_input @ restart_weights[name], base)
        z = gamma * base + scores @ deltas
        if uses_momentum:
            z = z + coefficients.carried[..., None] * (layer_input @ momentum[name])
        return z if token_scale is None else token_scale[name] * z

    output, _ = architecture.run_layers(query, read_layer)

    def at_last(x, axis=-1):  # row `last` of a per-token coefficient
        return jax.lax.dynamic_index_in_dim(x, last, axis % x.ndim, keepdims=False)

    def as_factor(x):  # [B, H] -> [B, H, 1, 1], to scale weight leaves
        return x[..., None, None]

    new_weights, new_momentum = {}, {} if uses_momentum else None
    for name, (inputs, deltas) in zip(names, factors):
        base = weights[name]
        if segments is not None:
            base = jnp.where(as_factor(at_last(pieces.fresh)), restart_weights[name], base)
        new = as_factor(at_last(start_decay)) * base
        new = new + _outer_sum(at_last(update_weight, axis=-2), inputs, deltas)
        if uses_momentum:
            new = new + as_factor(at_last(coefficients.carried)) * momentum[name]
            carried = as_factor(at_last(coefficients.momentum_carried)) * momentum[name]
            momentum_row = at_last(coefficients.momentum_update, axis=-2) * -lr
            new_momentum[name] = carried + _outer_sum(per_entry(spec, momentum_row), inputs, deltas)
        new_weights[name] = new
    return NeuralMemoryState(new_weights, new_momentum, entries.carried), output


def _heads_major(x):
    """[B, T, H, ...] -> [B, H, T, ...] in float32 or wider (None stays None)."""
    return None if x is None else jnp.moveaxis(at_least_float32(x), 1, 2)


def _split_chunks(x, num_chunks, chunk_size, pad_value):
    """[B, H, T, ...] -> [num_chunks, B, H, chunk_size, ...], padding T with `pad_value`."""
    if x is None:
        return None
    batch, heads, seq_len = x.shape[:3]
    padding = [(0, 0)] * x.ndim
    padding[2] = (0, num_chunks * chunk_size - seq_len)
    x = jnp.pad(x, padding, constant_values=pad_value)
    x = x.reshape((batch, heads, num_chunks, chunk_size) + x.shape[3:])
    return jnp.moveaxis(x, 2, 0)


def chunked_scan(spec, inputs: MemoryInputs, initial_state, chunk_size, segment_ids=None,
                 restart_from=None):  # fmt: skip
    """Chunk-parallel form: inputs as `reference.exact_scan` -> (o in v's dtype, final state).

    Equals `reference.chunk_start_scan(..., chunk_size)`; with chunk_size 1 the exact rule.
    segment_ids [B, T]: packed rows, each document restarting from `initial_state`'s weights
    (`segments`), or from `restart_from`'s when given (a piece of a longer sequence that
    starts mid-document, `layers.context_parallel`).
    """
    if segment_ids is not None and spec.lag_token_chunk:
        raise ValueError(chunked_lag_token.PACKED_ROWS_ERROR)
    seq_len = inputs.q.shape[1]
    num_chunks = -(-seq_len // chunk_size)
    state = jax.tree.map(at_least_float32, initial_state)
    pads = pad_values(spec.extra_inputs)
    chunks = inputs.map(
        lambda name, x: _split_chunks(_heads_major(x), num_chunks, chunk_size, pads[name])
    )
    last = jnp.full((num_chunks,), chunk_size - 1).at[-1].set((seq_len - 1) % chunk_size)
    if segment_ids is None:
        starts = jnp.zeros((num_chunks,), bool)  # unused: no document starts
    else:
        restart = reset_state(spec, jax.tree.map(at_least_float32, restart_from or state))
        starts = _split_chunks(document_starts(segment_ids)[:, None], num_chunks, chunk_size, False)

    def step(carry, xs):
        chunk, chunk_last, chunk_starts = xs
        if segment_ids is None:
            return chunk_step(spec, carry, chunk, chunk_last)
        chunk_starts = chunk_starts[:, 0]  # [B, b]
        carry = where_rows(chunk_starts[:, 0], restart, carry)  # a document opens the chunk
        segments = (chunk_pieces(chunk_starts), restart.weights)
        return chunk_step(spec, carry, chunk, chunk_last, segments)

    # The backward recomputes each chunk from its start state instead of keeping the
    # chunk's intermediates for every chunk. The materialised chunk (muon, lq, kl) makes
    # [B, H, b, d_in, d_out] per-token weights; kept for every chunk they were the
    # backward's peak (ATLAS 3.9 GiB at T 4096, 21x the LMM's), recomputed one chunk at a
    # time 85 MiB. The linear chunk is faster recomputed too: on CPU, stacking its ~100
    # per-chunk residuals cost more than a second forward (Titans layer at the peers'
    # config, 2 x 1024 tokens, one core: fwd + bwd 0.31 -> 0.23 s at chunk 64; README,
    # "Against the peers").
    step = jax.checkpoint(step)
    scanned = (chunks, last, starts)
    state, outputs = jax.lax.scan(step, state, scanned)
    batch, heads = outputs.shape[1:3]
    outputs = jnp.moveaxis(outputs, 0, 2).reshape(batch, heads, num_chunks * chunk_size, -1)
    return jnp.moveaxis(outputs[:, :, :seq_len], 2, 1).astype(inputs.v.dtype), state
