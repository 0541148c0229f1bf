"""NorMuon: Muon with per-neuron adaptive step sizes (Li et al. 2025, zichongli5/NorMuon).

After Muon's orthogonalised direction `O = NS5(u)` (see `optim.muon`), each output neuron
gets its own step size from a second moment of `O` (reference `normuon_update`):

    v      <- beta2 * v + (1 - beta2) * mean_over_fan_in(O ** 2)     one value per neuron
    O'     <- O / (sqrt(v) + 1e-10)
    O''    <- O' * ||O||_F / (||O'||_F + 1e-10)        keeps Muon's update norm
    W      <- W * (1 - lr * wd) - lr * O'' * scale(fan_in, fan_out)

Output neurons are the rows of the PyTorch `[fan_out, fan_in]` weight, i.e. the LAST axis of
a Flax kernel, so `v` has shape `[..., 1, fan_out]` and the mean runs over axis -2. The
normalisation runs in float32 (the reference keeps Newton-Schulz's bfloat16 there).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.muon import check_matrices, momentum_step
from optim.newton_schulz import ns_dtype, orthogonalize, update_scale
from optim.tree_utils import map_unzip

NORMALIZE_EPS = 1e-10  # the reference's epsilon, in both divisions


class NorMuonState(NamedTuple):
    momentum: optax.Updates
    neuron_second_moment: optax.Updates  # [..., 1, fan_out] per matrix


def scale_by_normuon(
    momentum: float = 0.95,
    nesterov: bool = True,
    beta2: float = 0.95,
    ns_steps: int = 5,
    ns_dtype_name: str = "bfloat16",
    scale: str = "shape",
) -> optax.GradientTransformation:
    """NorMuon's direction (no learning rate, no weight decay)."""
    dtype = ns_dtype(ns_dtype_name)
    update_scale(1, 1, scale)

    def init_fn(params):
        check_matrices(params, "normuon")
        return NorMuonState(
            momentum=jax.tree.map(jnp.zeros_like, params),
            neuron_second_moment=jax.tree.map(
                lambda p: jnp.zeros(p.shape[:-2] + (1, p.shape[-1]), jnp.float32), params
            ),
        )

    def update_fn(updates, state, params=None):
        del params
        direction, buffers = momentum_step(updates, state.momentum, momentum, nesterov)

        def normalized(u, second_moment):
            ortho = orthogonalize(u, steps=ns_steps, dtype=dtype).astype(jnp.float32)
            norm_before = jnp.linalg.norm(ortho, axis=(-2, -1), keepdims=True)
            neuron_mean_square = jnp.mean(ortho * ortho, axis=-2, keepdims=True)
            second_moment = beta2 * second_moment + (1.0 - beta2) * neuron_mean_square
            ortho = ortho / (jnp.sqrt(second_moment) + NORMALIZE_EPS)
            norm_after = jnp.linalg.norm(ortho, axis=(-2, -1), keepdims=True)
            ortho = ortho * (norm_before / (norm_after + NORMALIZE_EPS))
            ortho = ortho * update_scale(u.shape[-2], u.shape[-1], scale)
            return ortho.astype(u.dtype), second_moment

        new_updates, second_moments = map_unzip(
            normalized, direction, state.neuron_second_moment, num_outputs=2
        )
        return new_updates, NorMuonState(buffers, second_moments)

    return optax.GradientTransformation(init_fn, update_fn)


def normuon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    beta2: float = 0.95,
    ns_steps: int = 5,
    ns_dtype: str = "bfloat16",
    scale: str = "shape",
    weight_decay: float = 0.0,
    weight_decay_mask=None,
) -> optax.GradientTransformation:
    """NorMuon with decoupled weight decay (`W <- W (1 - lr wd) - lr update`)."""
    return optax.chain(
        scale_by_normuon(momentum, nesterov, beta2, ns_steps, ns_dtype, scale),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
