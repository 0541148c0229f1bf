"""Muon: momentum orthogonalised by Newton-Schulz (Jordan et al. 2024, KellerJordan/Muon).

Per matrix `W` (Flax layout `[fan_in, fan_out]`, leading axes = independent matrices):

    buf    <- beta * buf + (1 - beta) * g                      (momentum.lerp_(g, 1 - beta))
    u      <- (1 - beta) * g + beta * buf   if nesterov else buf   (g.lerp_(buf, beta))
    update <- NS5(u) * scale(fan_in, fan_out)
    W      <- W * (1 - lr * wd) - lr * update

This is the Nesterov form of the reference implementation. `optax.contrib.muon` differs after
step 1 (it applies bias correction and its own Nesterov blend), so its numbers do not match
the reference; this module does. Only (stacks of) matrices belong here: route embeddings,
head, norms and biases to AdamW (`optim.routing`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.newton_schulz import ns_dtype, orthogonalize, update_scale


class MuonState(NamedTuple):
    momentum: optax.Updates


def momentum_step(grads, buffers, beta: float, nesterov: bool):
    """Reference Muon momentum: returns (direction to orthogonalise, new buffers)."""
    new_buffers = jax.tree.map(lambda g, b: beta * b + (1.0 - beta) * g, grads, buffers)
    if not nesterov:
        return new_buffers, new_buffers
    direction = jax.tree.map(lambda g, b: (1.0 - beta) * g + beta * b, grads, new_buffers)
    return direction, new_buffers


def check_matrices(tree, name: str):
    for leaf in jax.tree.leaves(tree):
        if leaf.ndim < 2:
            raise ValueError(f"{name} only takes (stacks of) matrices, got shape {leaf.shape}")


def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_dtype_name: str = "bfloat16",
    scale: str = "shape",
) -> optax.GradientTransformation:
    """Muon's direction (no learning rate, no weight decay): `NS5(nesterov momentum) * scale`."""
    dtype = ns_dtype(ns_dtype_name)
    update_scale(1, 1, scale)  # validates the rule name now, not at the first step

    def init_fn(params):
        check_matrices(params, "muon")
        return MuonState(momentum=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        direction, buffers = momentum_step(updates, state.momentum, momentum, nesterov)

        def orthogonal(u):
            ortho = orthogonalize(u, steps=ns_steps, dtype=dtype).astype(u.dtype)
            return ortho * update_scale(u.shape[-2], u.shape[-1], scale)

        return jax.tree.map(orthogonal, direction), MuonState(momentum=buffers)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_dtype: str = "bfloat16",
    scale: str = "shape",
    weight_decay: float = 0.0,
    weight_decay_mask=None,
) -> optax.GradientTransformation:
    """Muon with decoupled weight decay: `W <- W (1 - lr wd) - lr NS5(u) scale`."""
    return optax.chain(
        scale_by_muon(momentum, nesterov, ns_steps, ns_dtype, scale),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
