"""Memory behaviour: per layer, how big the memory state is and how well it retrieves, token
by token, as the sequence streams past.

For a memory layer with state M_t after token t (its keys k_t and values v_t are the ones the
layer writes, after its projections, convolutions and normalisations):

    state_norm[t]    ||M_t||_F (square root of the sum over the memory's weight matrices),
    error_before[t]  ||M_{t-1}(k_t) - v_t||  retrieval of the new pair before writing it
                     (the "surprise" of Titans eq. 12, before any decay),
    error_after[t]   ||M_t(k_t) - v_t||      the same pair right after the update,
    recall_error[t]  mean_{i <= t} ||M_t(k_i) - v_i||  how well the memory at t still
                     recalls every pair written so far (forgetting shows here),
    value_norm[t]    ||v_t||  the scale the errors compare to (0 error = perfect recall),

each averaged over batch rows and heads ([T] arrays). Every block says what its memory
writes (`block.memory_writes`, a record of `layers.memory_writes`), and the trace replays it
with the memory's own read M(k):
  * DeepMemoryWrites (Titans, ATLAS and Miras kinds; MAC on its segments' attention
    outputs): M(k) = the memory network at k on the effective weights (lq's normalised
    accumulator, kl's softmax), M_t as the layer computes it in training, i.e. the
    chunk-start rule (`reference.chunk_start_scan`: gradients at the chunk-start point,
    Titans eqs. 16-18, with the Omega window) with the layer's chunk size.
  * MatrixMemoryWrites (linear attention, GLA, DeltaNet, Gated DeltaNet): M(k) = S^T k, S_t
    as in `layers.linear_memory` (for linear attention / GLA, S^T k is not trained towards
    v, so their errors grow with the number of tokens by construction); with linear
    attention's normaliser M(k) = S^T k / (z^T k + eps). Mixture-of-Memories
    folds its memories (the routed ones and the shared one) into heads and marks which
    (token, head) pairs were routed (`written`): a memory's errors count only its tokens,
    its recall error the pairs it has stored; the state norm is the mean over all of them.
  * NoMemory (attention, swa; MAC when its segments do not align with the memory's chunks):
    the layer is listed with the block's reason.

    trace(model, tokens) -> {"layer_00": {"kind", "state_norm", ... [T] numpy}, ...,
                             "layer_01": {"kind": "attention", "skipped": reason}}
    scalars(traced) -> {"memory/layer_00/state_norm": final value, ...}
    figure(traced) -> matplotlib Figure (state norm and errors over t, one line per layer)
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.linear_memory import DECAY_RULES, DELTA_RULES
from layers.memory_writes import DeepMemoryWrites, MatrixMemoryWrites, NoMemory
from pallas_kernels.linear_memory.api import NORMALIZER_EPS
from pallas_kernels.neural_memory import reference

QUANTITIES = ("state_norm", "error_before", "error_after", "recall_error", "value_norm")


def _norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


def _recall_error(predictions, values, t):
    """mean over i <= t of ||pred_i - v_i||: predictions, values [B, H, T, D] -> [B, H]."""
    errors = _norm(predictions - values)
    past = jnp.arange(values.shape[2]) <= t
    return jnp.sum(jnp.where(past, errors, 0.0), axis=-1) / (t + 1)


def _summarise(per_token):
    """{name: [T, B, H]} -> {name: [T]} (mean over batch rows and heads)."""
    return {name: jnp.mean(value, axis=(1, 2)) for name, value in per_token.items()}


def neural_memory_trace(spec, inputs, initial_state, chunk_size):
    """Diagnostics of the deep memory (module docstring) with the chunk-start rule, for any
    Miras choice (`reference.chunk_start_scan`, which the chunked form is held to).

    inputs: the `MemoryInputs` [B, T, H, ...] of `NeuralMemory.features`; initial_state:
    NeuralMemoryState [B, H, ...]. M_t(k) reads the effective weights (lq's normalised
    accumulator, kl's softmax), and the state norm is theirs. Returns ({quantity: [T]},
    outputs o_t = M_t(q_t) [B, T, H, Dv]).
    """
    forward = spec.memory_architecture.forward
    heads_major = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 2)  # noqa: E731
    all_keys, all_values = heads_major(inputs.k), heads_major(inputs.v)  # [B, H, T, D]
    # Memora's lag-token chunk hands the observer the weights each token reads themselves.
    read_weights = (lambda w: w) if spec.lag_token_chunk else spec.effective_weights

    def read(state, x):  # x [B, H, D] -> [B, H, Dv] through the effective weights
        output, _ = forward(read_weights(state.weights), x[..., None, :])
        return output[..., 0, :]

    def observe(t, before, after, token):
        key, value = token.k, token.v
        weights = read_weights(after.weights)
        predictions, _ = forward(weights, all_keys)
        return {
            "state_norm": jnp.sqrt(
                sum(jnp.sum(jnp.square(w), axis=(-2, -1)) for w in weights.values())
            ),
            "error_before": _norm(read(before, key) - value),
            "error_after": _norm(read(after, key) - value),
            "recall_error": _recall_error(predictions, all_values, t),
            "value_norm": _norm(value),
        }

    outputs, _, per_token = reference.chunk_start_scan(
        spec, inputs, initial_state, chunk_size, observe=observe
    )
    return _summarise(per_token), outputs


def linear_memory_trace(rule, q, k, v, g, beta, *, scale=None, written=None, normalize=False):
    """Diagnostics of a matrix memory S [Dk, Dv] per head (module docstring), token by token.

    q, k [B, T, H, Dk], v [B, T, H, Dv], g / beta [B, T, H] or None (`LinearMemory.features`).
    written [B, T, H] bool or None (all): which (token, head) pairs are written -- for
    Mixture-of-Memories, whose memories are heads and take only their routed tokens -- so
    the errors and value norms average over written pairs only, and the recall error of a
    head over the pairs it has stored (heads that have stored none yet are left out).
    normalize: the memory reads S^T x / (z^T x + eps), z the decayed sum of keys (linear
    attention's normaliser; the state then carries z as a last value column, as
    `normalized_recurrence` does), and there is no scale.
    Returns ({quantity: [T]}, outputs o_t = scale S_t^T q_t [B, T, H, Dv]).
    """
    scale = 1.0 if normalize else (q.shape[-1] ** -0.5 if scale is None else scale)
    time_major = lambda x: None if x is None else jnp.moveaxis(x.astype(jnp.float32), 1, 0)  # noqa: E731
    q, k, v = time_major(q), time_major(k), time_major(v)
    g = jnp.zeros(q.shape[:3]) if g is None or rule not in DECAY_RULES else time_major(g)
    beta = jnp.ones(q.shape[:3]) if beta is None else time_major(beta)
    written = jnp.ones(q.shape[:3]) if written is None else time_major(written)
    # What the state stores per key: v, and a 1 whose column sums the keys into z.
    stored_v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1) if normalize else v
    all_keys, all_values = jnp.moveaxis(k, 0, 2), jnp.moveaxis(v, 0, 2)
    all_written = jnp.moveaxis(written, 0, 2)  # [B, H, T]

    def normalized(out):
        return out[..., :-1] / (out[..., -1:] + NORMALIZER_EPS) if normalize else out

    def read(state, x):
        return normalized(jnp.einsum("bhk,bhkv->bhv", x, state))

    def weighted_mean(x, weights):
        return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def body(state, token):
        t, query, key, value, value_in, g_t, beta_t, written_t = token
        before = _norm(read(state, key) - value)
        retained = jnp.exp(g_t)[..., None, None] * state
        if rule in DELTA_RULES:
            update = beta_t[..., None] * (value - read(retained, key))
        else:
            update = value_in
        state = retained + jnp.einsum("bhk,bhv->bhkv", key, update)
        errors = _norm(normalized(jnp.einsum("bhtk,bhkv->bhtv", all_keys, state)) - all_values)
        stored = all_written * (jnp.arange(all_keys.shape[2]) <= t)  # [B, H, T]
        count = jnp.sum(stored, axis=-1)
        recall = jnp.sum(errors * stored, axis=-1) / jnp.maximum(count, 1.0)
        memory = state[..., : value.shape[-1]]  # S without z
        diagnostics = {
            "state_norm": jnp.mean(jnp.sqrt(jnp.sum(jnp.square(memory), axis=(-2, -1)))),
            "error_before": weighted_mean(before, written_t),
            "error_after": weighted_mean(_norm(read(state, key) - value), written_t),
            "recall_error": weighted_mean(recall, count > 0),
            "value_norm": weighted_mean(_norm(value), written_t),
        }
        return state, (diagnostics, scale * read(state, query))

    batch, heads = q.shape[1], q.shape[2]
    state = jnp.zeros((batch, heads, k.shape[-1], stored_v.shape[-1]), jnp.float32)
    steps = jnp.arange(q.shape[0])
    tokens = (steps, q, k, v, stored_v, g, beta, written)
    _, (per_token, outputs) = jax.lax.scan(body, state, tokens)
    return per_token, jnp.moveaxis(outputs, 0, 1)


@nnx.jit
def _block_inputs(model, tokens):
    return model.block_inputs(tokens)


@nnx.jit
def _trace_block(block, x):
    """The block's own account of what its memory writes (`block.memory_writes`, the probe
    contract of `models.registry`), replayed token by token."""
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]).astype(jnp.int32)
    writes = block.memory_writes(x, positions=positions)
    if isinstance(writes, DeepMemoryWrites):
        traced, _ = neural_memory_trace(
            writes.spec, writes.inputs, writes.initial_state, writes.chunk_size
        )
        return {name: value[: writes.length] for name, value in traced.items()}
    if isinstance(writes, MatrixMemoryWrites):
        inputs = (writes.q, writes.k, writes.v, writes.g, writes.beta)
        traced = linear_memory_trace(
            writes.rule, *inputs, written=writes.written, normalize=writes.normalize
        )
        return traced[0]
    return writes


def trace(model, tokens) -> dict[str, dict]:
    """Per-layer memory diagnostics of `model` (a `models.lm.LanguageModel`) reading
    `tokens` [B, T] int: see the module docstring for the quantities ([T] numpy arrays)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    result = {}
    for index, (block, x) in enumerate(zip(model.blocks, _block_inputs(model, tokens))):
        traced = _trace_block(block, x)
        entry = {"kind": model.block_kinds[index]}
        if isinstance(traced, NoMemory):
            entry["skipped"] = traced.reason
        else:
            entry.update(jax.device_get(traced))
        result[f"layer_{index:02d}"] = entry
    return result


def scalars(traced: dict) -> dict[str, float]:
    """TensorBoard scalars: per traced layer, the final state norm and recall error, and the
    mean retrieval error before / after the write (over the sequence)."""
    out = {}
    for name, entry in traced.items():
        if "skipped" in entry:
            continue
        prefix = f"memory/{name}"
        out[f"{prefix}/state_norm"] = float(entry["state_norm"][-1])
        out[f"{prefix}/recall_error"] = float(entry["recall_error"][-1])
        out[f"{prefix}/error_before"] = float(np.mean(entry["error_before"]))
        out[f"{prefix}/error_after"] = float(np.mean(entry["error_after"]))
    return out


def figure(traced: dict):
    """A matplotlib Figure: state norm, retrieval error before/after the write, and recall
    error over past tokens, against the token index, one line per traced layer."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (TensorBoard, CI)
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for name, entry in traced.items():
        if "skipped" in entry:
            continue
        label = f"{name} ({entry['kind']})"
        axes[0].plot(entry["state_norm"], label=label)
        (line,) = axes[1].plot(entry["error_before"], label=f"{label} before")
        axes[1].plot(entry["error_after"], "--", color=line.get_color(), label=f"{label} after")
        axes[2].plot(entry["recall_error"], label=label)
    titles = ("state norm ||M_t||", "||M(k_t) - v_t|| before / after write", "mean recall error")
    for axis, title in zip(axes, titles):
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("token t")
        if axis.lines:
            axis.legend(fontsize=7)
    fig.tight_layout()
    return fig
