"""The expensive, parallel part of a chunk: every inner-loss gradient of the chunk at once.

Token s of a chunk of b tokens updates with u_s = sum_{j<c} gamma_{s,j} grad l(P_s; k_{s,j},
v_{s,j}) over its Omega window (gamma_{s,j}: the gate of the slot's token, times token s's
gate for slot j with `omega_gates="pair"`) (ATLAS eq. 9; c = 1: just its own token), all at the
chunk-start point P_s (see `reference.chunk_start_scan`). The b*c (token, window slot)
pairs are laid out as one flat axis of "entries" (token major, window oldest first), the
memory network runs forward on all of them and is backpropagated by hand
(`MemoryArchitecture.backward`): layer l's gradient of entry e is the outer product
a_{l,e}^T delta_{l,e}, with gamma folded into delta. The window's tokens before the chunk
come from the state (`NeuralMemoryState.window`), so a chunk is self-contained.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory.choices_miras import window_tokens, with_pair_gates


class WindowEntries(NamedTuple):
    """The chunk's (token, window slot) entries: keys [B, H, b*c, Dk], values [B, H, b*c, Dv],
    bias_inputs {name: [B, H, b*c]} (the inputs the bias declares), gates [B, H, b*c] (None
    when absent), and the window after token `last` (tokens are axis 2 of every window leaf)."""

    keys: jax.Array
    values: jax.Array
    bias_inputs: dict
    gates: jax.Array | None
    carried: dict | None


def window_entries(spec, window, chunk, last) -> WindowEntries:
    """Lay out the Omega windows of a chunk (a heads-major `MemoryInputs`, see the module
    doc). With c = 1 the entries are the chunk's own tokens, untouched (so the Titans path
    computes exactly what it did)."""
    size = spec.omega_window
    bias_names = [item.name for item in spec.attentional_bias.inputs]
    if size == 1:
        bias_inputs = {name: chunk.extra[name] for name in bias_names}
        return WindowEntries(chunk.k, chunk.v, bias_inputs, chunk.extra.get("omega_gate"), None)
    tokens = window_tokens(spec, chunk)
    # [c-1 carried tokens; b chunk tokens] along the token axis.
    joined = {name: jnp.concatenate([window[name], tokens[name]], axis=2) for name in window}
    chunk_size = chunk.k.shape[2]
    # Entry (s, j) reads joined token s + j: token s's window, oldest (j = 0) first.
    index = (jnp.arange(chunk_size)[:, None] + jnp.arange(size)[None, :]).reshape(-1)
    entries = {name: jnp.take(x, index, axis=2) for name, x in joined.items()}
    carried = {
        name: jax.lax.dynamic_slice_in_dim(x, last + 1, size - 1, axis=2)
        for name, x in joined.items()
    }
    bias_inputs = {name: entries[name] for name in bias_names}
    gates = with_pair_gates(spec, entries["gate"], chunk)  # empty window's slots: 0
    return WindowEntries(entries["k"], entries["v"], bias_inputs, gates, carried)


def per_entry(spec, x):
    """A per-token coefficient [..., b] repeated for each of the token's c window entries."""
    return x if spec.omega_window == 1 else jnp.repeat(x, spec.omega_window, axis=-1)


def gradient_factors(spec, weights, entries: WindowEntries, scale=1.0):
    """[(a_l, delta_l)] per layer, [B, H, b*c, .] each, at the memory `weights` scaled by
    `scale` ([B, H, b*c, 1] or a number): sum_e a_{l,e}^T delta_{l,e} over a token's
    entries is its gradient u_s for layer l. Also returns the memory's predictions."""
    architecture, bias = spec.memory_architecture, spec.attentional_bias
    prediction, cache = architecture.forward(weights, entries.keys, scale=scale)
    output_grad = bias.output_grad(prediction, entries.values, **entries.bias_inputs)
    if entries.gates is not None:  # backprop is linear in the output cotangent
        output_grad = entries.gates[..., None] * output_grad
    return architecture.backward(weights, cache, output_grad, scale=scale)


def per_token_gradients(spec, factors, names):
    """u_s per layer as materialised [B, H, b, d_in, d_out] leaves (sums over the window)."""
    size = spec.omega_window
    gradients = {}
    for name, (inputs, deltas) in zip(names, factors):
        inputs = inputs.reshape(inputs.shape[:2] + (-1, size, inputs.shape[-1]))
        deltas = deltas.reshape(deltas.shape[:2] + (-1, size, deltas.shape[-1]))
        gradients[name] = jnp.einsum("...sjm,...sjn->...smn", inputs, deltas)
    return gradients
