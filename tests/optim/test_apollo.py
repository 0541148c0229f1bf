"""APOLLO / APOLLO-Mini against a float64 NumPy transcription of the reference `AdamW.step`
of zhuhanqing/APOLLO (`apollo_torch`), written on PyTorch `[fan_out, fan_in]` weights.

The random projection is the one input both sides share: the test regenerates it from the
key stored in the optimizer state (`apollo.projection_matrix`), which is also how the
optimizer itself gets it, and feeds it to the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim import apollo

LR, B1, B2, EPS, GAMMA = 0.01, 0.9, 0.999, 1e-6, 1.01
# float32 JAX vs float64 NumPy over 5 steps: float32 rounding of O(1) values only.
RTOL, ATOL = 2e-5, 2e-6


def apollo_step_pt(W, G, P, state, *, scale_type, scale, wd):
    """The reference step on PyTorch-layout W, G [m, n]; P is the current projection."""
    m, n = G.shape
    R = G @ P.T if m >= n else P.T @ G  # "right" projection when m >= n, else "left"
    state["step"] += 1
    state["exp_avg"] = B1 * state["exp_avg"] + (1 - B1) * R
    state["exp_avg_sq"] = B2 * state["exp_avg_sq"] + (1 - B2) * R * R
    t = state["step"]
    step_size = LR * np.sqrt(1 - B2**t) / (1 - B1**t)
    N = state["exp_avg"] / (np.sqrt(state["exp_avg_sq"]) + EPS)
    if scale_type == "channel":
        norm_dim = 0 if N.shape[0] < N.shape[1] else 1
        factor = np.linalg.norm(N, axis=norm_dim) / (np.linalg.norm(R, axis=norm_dim) + 1e-8)
        if norm_dim == 1:
            factor = factor[:, None]
    else:
        factor = np.linalg.norm(N) / (np.linalg.norm(R) + 1e-8)
    scaled = G * factor
    if "previous" in state:  # norm-growth limiter (Fira)
        norm = np.linalg.norm(scaled)
        limiter = max(norm / (state["previous"] + 1e-8), GAMMA) / GAMMA
        scaled = scaled / limiter
        state["previous"] = norm / limiter
    else:
        state["previous"] = np.linalg.norm(scaled)
    W = W - step_size * scaled * np.sqrt(scale)
    return W - LR * wd * W  # decay of the updated weights (p.add_(p, alpha=-lr*wd))


@pytest.mark.parametrize(
    "scale_type,rank,scale", [("channel", 3, 1.0), ("tensor", 1, 128.0)], ids=["apollo", "mini"]
)
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_reference(scale_type, rank, scale, shape, weight_decay):
    rng = np.random.default_rng(0)
    W0 = rng.normal(size=shape).astype(np.float32)
    # Gradients that grow step to step, so the norm-growth limiter really acts.
    grads = [(1.5**step) * rng.normal(size=shape).astype(np.float32) for step in range(5)]
    gap = 2  # fresh projections at steps 0, 2, 4
    tx = apollo.apollo(
        LR,
        rank=rank,
        update_proj_gap=gap,
        scale=scale,
        scale_type=scale_type,
        b1=B1,
        b2=B2,
        eps=EPS,
        weight_decay=weight_decay,
    )
    params = {"w": jnp.asarray(W0)}
    state = tx.init(params)
    key_data = state.projection_key["w"]
    update = jax.jit(tx.update)

    W_pt = W0.T.astype(np.float64)
    low_rank_pt = apollo.low_rank_shape(shape, rank)[::-1]
    ref = {"step": 0, "exp_avg": np.zeros(low_rank_pt), "exp_avg_sq": np.zeros(low_rank_pt)}
    for step, g in enumerate(grads):
        updates, state = update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        P = np.asarray(apollo.projection_matrix(key_data, shape, rank, step // gap), np.float64)
        W_pt = apollo_step_pt(
            W_pt,
            g.T.astype(np.float64),
            P,
            ref,
            scale_type=scale_type,
            scale=scale,
            wd=weight_decay,
        )
        np.testing.assert_allclose(params["w"], W_pt.T, rtol=RTOL, atol=ATOL, err_msg=str(step))

    # Low-rank states only: r x (larger side); the projection is stored as a key.
    assert state.exp_avg["w"].shape == state.exp_avg_sq["w"].shape == low_rank_pt[::-1]
    assert state.projection_key["w"].shape == (2,) and state.projection_key["w"].dtype == "uint32"


def test_projection_redrawn_every_gap_and_scaled():
    key_data = jax.random.key_data(jax.random.key(3))
    first = apollo.projection_matrix(key_data, (64, 256), 32, 0)
    assert first.shape == (32, 64)  # fan_in <= fan_out: projects fan_in
    np.testing.assert_array_equal(first, apollo.projection_matrix(key_data, (64, 256), 32, 0))
    assert not np.allclose(first, apollo.projection_matrix(key_data, (64, 256), 32, 1))
    # Entries N(0, 1/r): std 1/sqrt(32) = 0.177, estimated from 2048 draws (+-3%).
    assert abs(float(jnp.std(first)) - 32**-0.5) < 0.1 * 32**-0.5
    assert apollo.projection_matrix(key_data, (256, 64), 32, 0).shape == (64, 32)


def test_stacked_matrices_and_rank_clamp():
    tx = apollo.apollo(LR, rank=8, update_proj_gap=5)
    params = {"w": jnp.ones((3, 4, 6))}
    state = tx.init(params)
    assert state.exp_avg["w"].shape == (3, 4, 6)  # rank clamped to the smaller side (4)
    assert state.previous_norm["w"].shape == (3, 1, 1)  # one limiter per matrix
    updates, _ = tx.update({"w": jnp.ones((3, 4, 6))}, state, params)
    assert updates["w"].shape == (3, 4, 6)
