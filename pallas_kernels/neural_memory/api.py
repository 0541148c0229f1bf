"""Public entry points of the deep (Titans / Miras) memory recurrence.

`neural_memory` runs a whole sequence; `step` one token (recurrent decoding); `read` the
memory without an update; `init_state` broadcasts learnable per-head initial weights over
the batch; `state_norms` gives per-head norms for logging. The recurrence itself is
documented in `reference.py`, the choices in `choices.py` / `choices_miras.py`.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import check_impl, kernel_platform
from pallas_kernels.neural_memory import chunked, kernel_api, reference
from pallas_kernels.neural_memory.choices import MemorySpec, NeuralMemoryState
from pallas_kernels.neural_memory.choices_miras import empty_window
from pallas_kernels.neural_memory.memory_inputs import MemoryInputs, check_extras


def init_state(spec: MemorySpec, initial_weights, batch_size) -> NeuralMemoryState:
    """Broadcast learnable initial weights (leaves [H, d_in, d_out]) to a float32 state [B, H, ...].

    Momentum starts at zero for the momentum / muon rules and is None for plain GD; the
    Omega window (omega_window > 1) starts empty (`choices_miras.empty_window`). Gradients
    flow back to `initial_weights` through the broadcast. For lq / kl retention the initial
    weights are what the state stores (the accumulator A_0 / the logits of kl), so the
    memory starts at `spec.effective_weights` of them.
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
    first = initial_weights[spec.memory_architecture.layer_names[0]]
    last = initial_weights[spec.memory_architecture.layer_names[-1]]
    window = empty_window(spec, batch_size, first.shape[0], first.shape[-2], last.shape[-1])
    return NeuralMemoryState(weights, momentum, window)


def step(spec: MemorySpec, state, token: MemoryInputs):
    """One token of the exact rule for decoding: q, k [B, H, Dk], v [B, H, Dv], the scalars
    [B, H] (log_decay None: no forgetting) -> (o_t [B, H, Dv] in v's dtype, new float32
    state)."""
    _check_scalars(spec, token, token.q.shape[:2], "[B, H]")
    _check_window(spec, state, token.q.shape[0], token.q.shape[1])
    as_float32 = _with_log_decay(token).map(lambda name, x: x.astype(jnp.float32))
    output, state = reference.step(spec, state, as_float32)
    return output.astype(token.v.dtype), state


def read(spec: MemorySpec, state: NeuralMemoryState, q):
    """M(q) without an update (Titans eq. 15), with the effective weights of the state (lq's
    normalised accumulator, kl's softmax): q [B, T, H, Dk] -> [B, T, H, Dv] float32."""
    queries = jnp.moveaxis(q.astype(jnp.float32), 1, 2)  # [B, H, T, Dk]
    output, _ = spec.memory_architecture.forward(spec.effective_weights(state.weights), queries)
    return jnp.moveaxis(output, 2, 1)


def state_norms(state: NeuralMemoryState, spec: MemorySpec | None = None) -> dict[str, jax.Array]:
    """Frobenius norm of every leaf per head, averaged over the batch: {"weights/W1": [H], ...}.

    With `spec`, "weights/..." are the norms of the effective weights (what the network runs
    on; differs from the stored state for lq / kl retention)."""

    def per_head(leaf):
        return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(leaf), axis=(-2, -1))), axis=0)

    weights = state.weights if spec is None else spec.effective_weights(state.weights)
    norms = {f"weights/{name}": per_head(leaf) for name, leaf in weights.items()}
    if state.momentum is not None:
        norms.update({f"momentum/{name}": per_head(leaf) for name, leaf in state.momentum.items()})
    return norms


def neural_memory(
    inputs: MemoryInputs,
    *,
    memory: MemorySpec,
    initial_state: NeuralMemoryState,
    chunk_size: int = 16,
    output_final_state: bool = False,
    impl: str = "auto",
    interpret: bool = False,
    segment_ids=None,
):
    """Deep-memory recurrence over a sequence (Titans eqs. 8-18, Miras choices in `memory`).

    inputs: q, k [B, T, H, Dk]; v [B, T, H, Dv]; lr (theta_t > 0), momentum (eta_t, None for
    the GD rule), log_decay (g_t <= 0; None means no forgetting) and in `extra` the inputs
    `memory.extra_inputs` declares (huber_delta delta_t > 0 for the huber bias; omega_gate,
    ATLAS eq. 9's gamma_t, optional for omega_window > 1: ones) [B, T, H]. `initial_state`
    leaves [B, H, d_in, d_out] (see `init_state`). q is used as given (scale it yourself).
    impl: "reference" (exact token rule, ignores chunk_size), "chunked" (gradients at each
    chunk's start memory, Titans eqs. 16-18; chunk_size 1 is the exact rule), "pallas_tpu" /
    "pallas_gpu" / "pallas" (by backend) the fused kernels of `kernel_api` (same result as
    chunked; they cover only the Titans LMM memory, and say why when they refuse a call;
    `interpret=True` runs them on CPU), "auto" (a kernel where `kernel_api` covers the
    backend, spec and shapes, else chunked). Returns (o [B, T, H, Dv] in v's dtype, final
    float32 state or None). segment_ids [B, T] int (packed rows): where the id changes the
    memory restarts from `initial_state`'s weights with zero momentum and an empty window,
    and a chunk starts (`segments`); the kernels take none (auto runs chunked).
    """
    check_impl(impl)
    _check_inputs(memory, inputs, initial_state, chunk_size)
    _check_segments(segment_ids, inputs.q.shape[:2])
    rejects, covers = kernel_api.kernel_checks(memory, inputs.q, inputs.k, inputs.v, chunk_size)
    if segment_ids is not None:  # no kernel has document resets

        def rejects(platform):
            return "segment_ids (packed sequences)"

    platform, interpret = kernel_platform(impl, interpret, rejects, covers)
    # No extra input reaches a kernel: every spec that declares one (check_extras) has a
    # bias or omega_window the kernels reject (`kernel_api.kernel_rejects`).
    if platform is not None:
        output, final_state = kernel_api.run_kernel(
            memory, inputs, initial_state, chunk_size=chunk_size, platform=platform,
            interpret=interpret,
        )  # fmt: skip
        return output, (final_state if output_final_state else None)
    inputs = _with_log_decay(inputs)
    if impl == "reference":
        output, final_state = reference.exact_scan(memory, inputs, initial_state, segment_ids)
    else:
        output, final_state = chunked.chunked_scan(
            memory, inputs, initial_state, chunk_size, segment_ids
        )
    return output, (final_state if output_final_state else None)


def _with_log_decay(inputs: MemoryInputs) -> MemoryInputs:
    """log_decay None (no forgetting) as zeros: the reference and chunked forms take one."""
    if inputs.log_decay is not None:
        return inputs
    return inputs.replace(log_decay=jnp.zeros_like(inputs.lr))


def _check_scalars(spec, inputs: MemoryInputs, leading, layout):
    """The gates must be per-token per-head scalars shaped `leading`; the extras exactly
    those the spec declares; momentum given exactly for a rule that uses it."""
    for name, value in inputs.named().items():
        if name not in ("q", "k", "v") and value.shape != tuple(leading):
            raise ValueError(f"{name} has shape {value.shape}; expected {layout}={leading}")
    check_extras(spec.extra_inputs, inputs.extra, f"MemorySpec(bias={spec.bias!r}, "
                 f"omega_window={spec.omega_window})")  # fmt: skip
    if spec.learning_rule.uses_momentum and inputs.momentum is None:
        raise ValueError(f"rule={spec.rule!r} needs a momentum (eta) input; got None")
    if not spec.learning_rule.uses_momentum and inputs.momentum is not None:
        raise ValueError(f"rule={spec.rule!r} takes no momentum input; pass momentum=None")


def _check_segments(segment_ids, leading):
    if segment_ids is None:
        return
    if tuple(segment_ids.shape) != tuple(leading):
        raise ValueError(f"segment_ids has shape {segment_ids.shape}; expected [B, T]={leading}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids has dtype {segment_ids.dtype}; expected integers")


def _check_window(spec, state, batch, heads):
    """The Omega window of the state must hold c - 1 tokens (None for c = 1)."""
    size = spec.omega_window - 1
    if size == 0:
        if state.window is not None:
            raise ValueError("initial_state.window must be None for omega_window=1")
        return
    wanted = {"k", "v", "gate"} | {item.name for item in spec.attentional_bias.inputs}
    if state.window is None or set(state.window) != wanted:
        got = None if state.window is None else sorted(state.window)
        raise ValueError(
            f"initial_state.window has {got}; omega_window={spec.omega_window} wants "
            f"{sorted(wanted)} (see api.init_state)"
        )
    if state.window["gate"].shape != (batch, heads, size):
        raise ValueError(
            f"initial_state.window['gate'] is {state.window['gate'].shape}, not "
            f"{(batch, heads, size)} (omega_window - 1 tokens)"
        )


def _check_inputs(spec, inputs: MemoryInputs, state, chunk_size):
    q, k, v = inputs.q, inputs.k, inputs.v
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q {q.shape} and k {k.shape} must both be [B, T, H, Dk]")
    batch, seq_len, heads, key_dim = q.shape
    if v.ndim != 4 or v.shape[:3] != (batch, seq_len, heads):
        raise ValueError(f"v has shape {v.shape}; expected [B, T, H, Dv] with B, T, H of q")
    if seq_len < 1:
        raise ValueError("neural_memory needs at least one token (T >= 1)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}; expected a positive int")
    _check_scalars(spec, inputs, (batch, seq_len, heads), "[B, T, H]")
    _check_window(spec, state, batch, heads)
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
