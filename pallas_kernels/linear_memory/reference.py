"""Token-by-token oracle for the matrix-memory recurrences (float32 `lax.scan`).

One scan body covers the four rules. With `a_t = exp(g_t)` (g = 0 when absent) the
state `S ∈ R^{Dk×Dv}` is updated per token as

    gated delta rule   S_t = a_t S_{t-1} + β_t k_t (v_t - a_t S_{t-1}^T k_t)^T
    delta rule         the same with g = 0
    simple GLA         S_t = a_t S_{t-1} + k_t v_t^T
    linear attention   the same with g = 0

and read out as `o_t = scale · S_t^T q_t` (flash-linear-attention conventions; Gated
DeltaNet, Yang et al. 2025, eq. 10; DeltaNet, Yang et al. 2024, eq. 1).

Packed sequences: where `segment_ids[t] != segment_ids[t-1]` the carried state is set to
zero before step t (a decay of exp(-inf)). `initial_state` applies only at t = 0: later
segments are new sequences and start from an empty memory.

This is slow and obvious on purpose; `chunked.py` is held to it in the tests.
"""

import jax
import jax.numpy as jnp

# The oracle must not inherit a backend's reduced default matmul precision (bf16 passes
# on TPU, TF32 on GPU); on CPU this is what the default does anyway.
_PRECISION = jax.lax.Precision.HIGHEST


def segment_resets(segment_ids, batch_size, length):
    """Boolean [B, T]: True where the state resets before token t (segment id changes).

    Token 0 never resets: the caller's `initial_state` is the state before it.
    """
    if segment_ids is None:
        return jnp.zeros((batch_size, length), dtype=bool)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((batch_size, 1), dtype=bool), changed], axis=1)


def recurrence(q, k, v, g=None, beta=None, *, scale, initial_state=None, segment_ids=None):
    """Run one of the four recurrences token by token.

    Args:
      q, k: [B, T, H, Dk]. v: [B, T, H, Dv].
      g: [B, T, H] log decay, or None (no decay, g = 0).
      beta: [B, T, H] delta-rule step size, or None (additive update `S += k v^T`).
      scale: readout scale (already resolved, e.g. Dk ** -0.5).
      initial_state: [B, H, Dk, Dv] or None (zeros).
      segment_ids: [B, T] integers or None (one sequence per row).

    Returns:
      (o [B, T, H, Dv] in v's dtype, final_state [B, H, Dk, Dv] float32).
    """
    batch_size, length, num_heads, key_dim = q.shape
    value_dim = v.shape[-1]
    f32 = jnp.float32
    use_delta = beta is not None
    if g is None:
        g = jnp.zeros((batch_size, length, num_heads), f32)
    if beta is None:
        beta = jnp.ones((batch_size, length, num_heads), f32)
    if initial_state is None:
        initial_state = jnp.zeros((batch_size, num_heads, key_dim, value_dim), f32)
    resets = segment_resets(segment_ids, batch_size, length)

    def step(state, inputs):
        q_t, k_t, v_t, g_t, beta_t, reset_t = inputs
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        state = jnp.exp(g_t)[:, :, None, None] * state
        if use_delta:
            prediction = jnp.einsum("bhkv,bhk->bhv", state, k_t, precision=_PRECISION)
            v_t = beta_t[:, :, None] * (v_t - prediction)
        state = state + k_t[:, :, :, None] * v_t[:, :, None, :]
        o_t = scale * jnp.einsum("bhkv,bhk->bhv", state, q_t, precision=_PRECISION)
        return state, o_t

    def time_major(x):
        return jnp.moveaxis(x.astype(f32), 1, 0)

    inputs = (q, k, v, g, beta)
    inputs = tuple(time_major(x) for x in inputs) + (jnp.moveaxis(resets, 1, 0),)
    final_state, o = jax.lax.scan(step, initial_state.astype(f32), inputs)
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), final_state
