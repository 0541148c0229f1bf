"""Packed sequences for the deep memory: every document restarts the memory.

With `segment_ids` [B, T] a row holds several documents; where the id changes between t-1
and t, token t starts a new document and the memory forgets the one before entirely:

    before token t:  M = M_0 (the weights of `initial_state`), S = 0, Omega window empty

so each document sees exactly what it would see run alone from `initial_state` (as
`api.init_state` makes it: zero momentum, empty window). A document start is also a chunk
start: the chunked form's gradients are taken at the start of the document's first chunk
(gamma_t M_0), so its chunks are [start, next multiple of b) and then the row's grid of b.
Run alone, a document has its own grid; the two agree when documents start at multiples of
b, and always with chunk_size 1 (the exact rule).

Inside a chunk of the chunked form, the tokens split into *pieces*: piece 0 continues the
chunk-start state, piece p >= 1 starts at the p-th document start inside the chunk and
continues M_0. Everything in a chunk is per-token linear algebra over lower-triangular
[b, b] coefficients, so the pieces separate by masking: the coefficients between tokens of
different pieces are zero (`restart_transfer`, `restart_momentum`), the Omega window drops
the entries of other pieces (`mask_window`), and a fresh piece's tokens read, and take their
gradients at, M_0 instead of the chunk-start memory (`Pieces.fresh`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory.choices import NeuralMemoryState
from pallas_kernels.neural_memory.choices_miras import empty_window


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int -> [B, T] bool: True at token t > 0 where the id differs from t - 1's."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def reset_state(spec, initial_state: NeuralMemoryState) -> NeuralMemoryState:
    """The state a document starts from: `initial_state`'s weights, zero momentum, empty
    Omega window."""
    first = initial_state.weights[spec.memory_architecture.layer_names[0]]
    last = initial_state.weights[spec.memory_architecture.layer_names[-1]]
    batch, heads, key_dim, value_dim = *first.shape[:3], last.shape[-1]
    momentum = None
    if initial_state.momentum is not None:
        momentum = jax.tree.map(jnp.zeros_like, initial_state.momentum)
    window = empty_window(spec, batch, heads, key_dim, value_dim, first.dtype)
    return NeuralMemoryState(initial_state.weights, momentum, window)


def where_rows(rows: jax.Array, new, old):
    """Per batch row (rows [B] bool): the pytree `new` where set, else `old`."""

    def pick(a, b):
        return jnp.where(rows.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


class Pieces(NamedTuple):
    """The pieces of one chunk, broadcasting over heads: piece [B, 1, b] int32 (0: continues
    the chunk-start state), fresh [B, 1, b] bool (piece >= 1: continues M_0), same [B, 1, b, b]
    bool (tokens t and i in one piece)."""

    piece: jax.Array
    fresh: jax.Array
    same: jax.Array


def chunk_pieces(starts: jax.Array) -> Pieces:
    """starts [B, b] bool: the chunk's document starts. One at the chunk's first token is
    the caller's (it replaces the chunk-start state) and opens no piece here."""
    starts = starts.at[:, 0].set(False)
    piece = jnp.cumsum(starts, axis=-1, dtype=jnp.int32)[:, None, :]
    return Pieces(piece, piece > 0, piece[..., :, None] == piece[..., None, :])


def restart_transfer(pieces: Pieces, log_decay, transfer):
    """Gamma_t from the start of t's piece (exp of the sum of g over the piece up to t, a
    masked sum: no cancellation) and A[t, j] zeroed across pieces. log_decay [B, H, b],
    transfer [B, H, b, b]."""
    size = log_decay.shape[-1]
    causal = jnp.tril(jnp.ones((size, size), bool))
    terms = jnp.where(causal & pieces.same, log_decay[..., None, :], 0.0)  # [t, i]
    return jnp.exp(jnp.sum(terms, axis=-1)), jnp.where(pieces.same, transfer, 0.0)


def restart_momentum(pieces: Pieces, eta):
    """eta [B, H, b] with eta = 0 at a piece's first token: S_r = 0 * S_{r-1} + w_r, so the
    momentum restarts from zero and no coefficient links tokens across pieces."""
    first = pieces.piece != jnp.pad(pieces.piece, ((0, 0), (0, 0), (1, 0)))[..., :-1]
    return jnp.where(first, 0.0, eta)


def mask_window(spec, pieces: Pieces, entries, last):
    """Omega window entries (`chunked_gradients.WindowEntries`) without the tokens of other
    pieces: their gates become 0. The carried window (the c-1 tokens up to `last`) keeps
    only the last token's piece; the others become empty-window tokens (gate 0), as after a
    reset, so the next chunk cannot see them."""
    size = spec.omega_window
    if size == 1:
        return entries
    chunk_size = pieces.piece.shape[-1]
    # The window's c-1 tokens before the chunk belong to piece 0.
    before = jnp.zeros(pieces.piece.shape[:2] + (size - 1,), jnp.int32)
    joined = jnp.concatenate([before, pieces.piece], axis=-1)  # [B, 1, c-1+b]
    index = (jnp.arange(chunk_size)[:, None] + jnp.arange(size)[None, :]).reshape(-1)
    own = jnp.repeat(pieces.piece, size, axis=-1)  # each entry's token's piece
    gates = jnp.where(jnp.take(joined, index, axis=-1) == own, entries.gates, 0.0)

    carried_piece = jax.lax.dynamic_slice_in_dim(joined, last + 1, size - 1, axis=2)
    last_piece = jax.lax.dynamic_index_in_dim(pieces.piece, last, 2, keepdims=True)
    keep = carried_piece == last_piece  # [B, 1, c-1]
    window = entries.carried
    empty = empty_window(
        spec, *window["k"].shape[:2], window["k"].shape[-1], window["v"].shape[-1],
        window["k"].dtype,
    )  # fmt: skip

    def pick(name, x):
        return jnp.where(keep if x.ndim == 3 else keep[..., None], x, empty[name])

    carried = {name: pick(name, x) for name, x in window.items()}
    return entries._replace(gates=gates, carried=carried)
