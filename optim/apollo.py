"""APOLLO and APOLLO-Mini (Zhu et al. 2025, "APOLLO: SGD-like Memory, AdamW-level
Performance", zhuhanqing/APOLLO `apollo_torch`).

Adam runs on a random rank-r projection `R` of each gradient matrix; the ratio of the Adam
direction's norm to `R`'s norm, per channel (APOLLO) or per tensor (APOLLO-Mini), rescales the
raw full-rank gradient (Algorithm 1 of the paper, and the reference `AdamW.step`):

    P      ~ N(0, 1/r), redrawn every `update_proj_gap` steps from a stored PRNG key
    R      = project(G, P)                               projects the smaller side to rank r
    m, v   <- b1 m + (1 - b1) R,  b2 v + (1 - b2) R^2    (low-rank states, no bias correction)
    N      = m / (sqrt(v) + eps)
    s      = ||N|| / (||R|| + 1e-8)                      over the rank axis, or the whole tensor
    u      = G * s;   limiter: u /= max(||u|| / (||u_prev|| + 1e-8), gamma) / gamma (Fira)
    W      <- (W - lr * sqrt(1 - b2^t) / (1 - b1^t) * sqrt(alpha) * u) * (1 - lr * wd)

Weight decay acts on the already-updated weights, as in the reference. Layout: a Flax kernel
`A = G^T` is `[fan_in, fan_out]`. The reference projects a PyTorch gradient `G [fan_out,
fan_in]` on the right when fan_out >= fan_in (`R = G P^T`), else on the left (`R = P^T G`);
for `A` that is `R^T = P A` (`P [r, fan_in]`) when fan_in <= fan_out, else `R^T = A P`
(`P [fan_out, r]`). Channels are the unprojected (larger) side in both cases, and the rank is
clamped to the smaller side. Leading axes of a leaf are independent matrices.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.tree_utils import map_unzip

SCALE_TYPES = ("channel", "tensor")
NORM_EPS = 1e-8  # the reference's epsilon in the scaling factor and the limiter


class ApolloState(NamedTuple):
    count: jnp.ndarray  # int32 steps taken
    exp_avg: optax.Updates  # low-rank first moment per leaf
    exp_avg_sq: optax.Updates  # low-rank second moment per leaf
    previous_norm: optax.Updates  # [..., 1, 1] norm of the last (limited) update per matrix
    projection_key: optax.Updates  # uint32 key data per leaf; the matrix is never stored


def _projects_fan_in(shape) -> bool:
    """Whether the projection acts on axis -2 (fan_in <= fan_out) or on axis -1."""
    return shape[-2] <= shape[-1]


def low_rank_shape(shape, rank: int) -> tuple[int, ...]:
    rank = min(rank, shape[-2], shape[-1])
    if _projects_fan_in(shape):
        return tuple(shape[:-2]) + (rank, shape[-1])
    return tuple(shape[:-2]) + (shape[-2], rank)


def projection_matrix(key_data, shape, rank: int, step) -> jnp.ndarray:
    """The Gaussian projection in use at `step`: entries N(0, 1/r), redrawn per period."""
    rank = min(rank, shape[-2], shape[-1])
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
    if _projects_fan_in(shape):
        proj_shape = tuple(shape[:-2]) + (rank, shape[-2])
    else:
        proj_shape = tuple(shape[:-2]) + (shape[-1], rank)
    return jax.random.normal(key, proj_shape, jnp.float32) / jnp.sqrt(float(rank))


def project(grad, projection):
    if _projects_fan_in(grad.shape):
        return projection @ grad
    return grad @ projection


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    norm_growth_limit: float = 1.01,
    seed: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask=None,
) -> optax.GradientTransformation:
    """APOLLO (`scale_type="channel"`) or APOLLO-Mini (`"tensor"`, rank 1, scale 128).

    Includes the learning rate, bias correction and weight decay, since the reference decays
    the updated weights with the plain learning rate while the step uses the corrected one.
    """
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")
    if rank < 1 or update_proj_gap < 1:
        raise ValueError(f"rank and update_proj_gap must be >= 1, got {rank}, {update_proj_gap}")
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        for leaf in leaves:
            if leaf.ndim < 2:
                raise ValueError(f"apollo only takes (stacks of) matrices, got {leaf.shape}")
        base = jax.random.key(seed)
        keys = iter(jax.random.key_data(jax.random.split(base, max(len(leaves), 1))))

        def zeros(p):
            return jnp.zeros(low_rank_shape(p.shape, rank), jnp.float32)

        return ApolloState(
            count=jnp.zeros([], jnp.int32),
            exp_avg=jax.tree.map(zeros, params),
            exp_avg_sq=jax.tree.map(zeros, params),
            previous_norm=jax.tree.map(
                lambda p: jnp.zeros(p.shape[:-2] + (1, 1), jnp.float32), params
            ),
            projection_key=jax.tree.map(lambda _: next(keys), params),
        )

    def update_fn(updates, state, params=None):
        if params is None and weight_decay:
            raise ValueError("apollo with weight decay needs params in update()")
        count = state.count
        t = (count + 1).astype(jnp.float32)
        period = count // update_proj_gap

        def leaf_update(grad, exp_avg, exp_avg_sq, previous_norm, key_data):
            grad32 = grad.astype(jnp.float32)
            low_rank = project(grad32, projection_matrix(key_data, grad.shape, rank, period))
            exp_avg = b1 * exp_avg + (1.0 - b1) * low_rank
            exp_avg_sq = b2 * exp_avg_sq + (1.0 - b2) * low_rank**2
            adam_direction = exp_avg / (jnp.sqrt(exp_avg_sq) + eps)
            if scale_type == "channel":
                rank_axis = -2 if _projects_fan_in(grad.shape) else -1
                axes = (rank_axis,)
            else:
                axes = (-2, -1)
            factor = jnp.linalg.norm(adam_direction, axis=axes, keepdims=True) / (
                jnp.linalg.norm(low_rank, axis=axes, keepdims=True) + NORM_EPS
            )
            scaled = grad32 * factor
            norm = jnp.linalg.norm(scaled, axis=(-2, -1), keepdims=True)
            growth = jnp.maximum(norm / (previous_norm + NORM_EPS), norm_growth_limit)
            limiter = jnp.where(count > 0, growth / norm_growth_limit, 1.0)
            scaled = scaled / limiter
            return scaled * jnp.sqrt(scale), exp_avg, exp_avg_sq, norm / limiter

        directions, exp_avg, exp_avg_sq, norms = map_unzip(
            leaf_update,
            updates,
            state.exp_avg,
            state.exp_avg_sq,
            state.previous_norm,
            state.projection_key,
            num_outputs=4,
        )
        lr = schedule(count)
        step_size = lr * jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        steps = jax.tree.map(lambda d: -step_size * d, directions)
        if weight_decay:
            mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
            if mask is None:
                mask = jax.tree.map(lambda _: True, params)
            # (W + step) * (1 - lr wd) - W = step - lr wd (W + step)
            steps = jax.tree.map(
                lambda s, p, m: s - lr * weight_decay * (p + s) if m else s, steps, params, mask
            )
        steps = jax.tree.map(lambda s, g: s.astype(g.dtype), steps, updates)
        new_state = ApolloState(count + 1, exp_avg, exp_avg_sq, norms, state.projection_key)
        return steps, new_state

    return optax.GradientTransformation(init_fn, update_fn)
