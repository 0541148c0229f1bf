"""Public entry points of the deep (Titans / Miras) memory recurrence.

`neural_memory` runs a whole sequence; `step` one token (recurrent decoding); `init_state`
broadcasts learnable per-head initial weights over the batch; `state_norms` gives per-head
norms for logging. The recurrence itself is documented in `reference.py`.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory import chunked, reference
from pallas_kernels.neural_memory.choices import MemorySpec, NeuralMemoryState

IMPLS = ("auto", "reference", "chunked", "pallas", "pallas_tpu", "pallas_gpu")


def init_state(spec: MemorySpec, initial_weights, batch_size) -> NeuralMemoryState:
    """Broadcast learnable initial weights (leaves [H, d_in, d_out]) to a float32 state [B, H, ...].

    Momentum starts at zero for the momentum rule and is None for plain GD. Gradients flow
    back to `initial_weights` through the broadcast.
    """
    names = spec.memory_architecture.layer_names
    if set(initial_weights) != set(names):
        raise ValueError(f"initial weights have keys {sorted(initial_weights)}, spec wants {names}")
    weights = {
        name: jnp.broadcast_to(
            initial_weights[name].astype(jnp.float32), (batch_size,) + initial_weights[name].shape
        )
        for name in names
    }
    momentum = None
    if spec.learning_rule.uses_momentum:
        momentum = {name: jnp.zeros_like(leaf) for name, leaf in weights.items()}
    return NeuralMemoryState(weights, momentum)


def step(spec: MemorySpec, state, q_t, k_t, v_t, lr_t, mom_t, g_t):
    """One token of the exact rule for decoding: q_t, k_t [B, H, Dk], v_t [B, H, Dv]; lr_t,
    mom_t (None for GD), g_t [B, H] -> (o_t [B, H, Dv] in v's dtype, new float32 state)."""
    _check_scalars(spec, q_t.shape[:2], "[B, H]", lr_t, mom_t, g_t)
    if g_t is None:
        g_t = jnp.zeros_like(lr_t)
    as_f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
    output, state = reference.step(spec, state, *map(as_f32, (q_t, k_t, v_t, lr_t, mom_t, g_t)))
    return output.astype(v_t.dtype), state


def state_norms(state: NeuralMemoryState) -> dict[str, jax.Array]:
    """Frobenius norm of every leaf per head, averaged over the batch: {"weights/W1": [H], ...}."""

    def per_head(leaf):
        return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(leaf), axis=(-2, -1))), axis=0)

    norms = {f"weights/{name}": per_head(leaf) for name, leaf in state.weights.items()}
    if state.momentum is not None:
        norms.update({f"momentum/{name}": per_head(leaf) for name, leaf in state.momentum.items()})
    return norms


def neural_memory(
    q,
    k,
    v,
    lr,
    momentum,
    log_decay,
    *,
    memory: MemorySpec,
    initial_state: NeuralMemoryState,
    chunk_size: int = 16,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """Deep-memory recurrence over a sequence (Titans eqs. 8-18, Miras choices in `memory`).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; lr (theta_t > 0), momentum (eta_t, None for the
    GD rule), log_decay (g_t <= 0; None means no forgetting): [B, T, H]. `initial_state`
    leaves [B, H, d_in, d_out] (see `init_state`). q is used as given (scale it yourself).
    impl: "reference" (exact token rule, ignores chunk_size), "chunked" (gradients at each
    chunk's start memory, Titans eqs. 16-18; chunk_size 1 is the exact rule), "auto" (chunked
    for now). Returns (o [B, T, H, Dv] in v's dtype, final float32 state or None).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    if impl.startswith("pallas"):
        raise NotImplementedError(f"impl={impl!r}: no Pallas kernel for neural_memory yet")
    _check_inputs(memory, q, k, v, lr, momentum, log_decay, initial_state, chunk_size)
    if log_decay is None:
        log_decay = jnp.zeros_like(lr)
    args = (memory, q, k, v, lr, momentum, log_decay, initial_state)
    if impl == "reference":
        output, final_state = reference.exact_scan(*args)
    else:
        output, final_state = chunked.chunked_scan(*args, chunk_size=chunk_size)
    return output, (final_state if output_final_state else None)


def _check_scalars(spec, leading, layout, lr, momentum, log_decay):
    """lr / momentum / log_decay must be per-token per-head scalars shaped `leading`."""
    for name, value in (("lr", lr), ("momentum", momentum), ("log_decay", log_decay)):
        if value is not None and value.shape != tuple(leading):
            raise ValueError(f"{name} has shape {value.shape}; expected {layout}={leading}")
    if spec.learning_rule.uses_momentum and momentum is None:
        raise ValueError(f"rule={spec.rule!r} needs a momentum (eta) input; got None")
    if not spec.learning_rule.uses_momentum and momentum is not None:
        raise ValueError(f"rule={spec.rule!r} takes no momentum input; pass momentum=None")


def _check_inputs(spec, q, k, v, lr, momentum, log_decay, state, chunk_size):
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q {q.shape} and k {k.shape} must both be [B, T, H, Dk]")
    batch, seq_len, heads, key_dim = q.shape
    if v.ndim != 4 or v.shape[:3] != (batch, seq_len, heads):
        raise ValueError(f"v has shape {v.shape}; expected [B, T, H, Dv] with B, T, H of q")
    if seq_len < 1:
        raise ValueError("neural_memory needs at least one token (T >= 1)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}; expected a positive int")
    _check_scalars(spec, (batch, seq_len, heads), "[B, T, H]", lr, momentum, log_decay)
    shapes = spec.weight_shapes(key_dim, v.shape[3])
    if spec.learning_rule.uses_momentum != (state.momentum is not None):
        raise ValueError(f"rule={spec.rule!r} and initial_state.momentum do not match")
    for part, leaves in (("weights", state.weights), ("momentum", state.momentum)):
        if leaves is None:
            continue
        if set(leaves) != set(shapes):
            raise ValueError(f"initial_state.{part} has {sorted(leaves)}; want {sorted(shapes)}")
        for name, leaf in leaves.items():
            expected = (batch, heads) + shapes[name]
            if leaf.shape != expected:
                raise ValueError(f"initial_state.{part}[{name!r}] is {leaf.shape}, not {expected}")
