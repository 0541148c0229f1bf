"""One Optax transformation for the whole model: clip, route, optimize, schedule.

    clip_by_global_norm (all gradients)  ->  partition:
        matrices      -> optim.name (Muon, NorMuon, APOLLO, APOLLO-Mini, SlimAdam)
        everything else -> AdamW (embeddings, head, norms, biases, gates, convs)

Both groups follow the same warmup + decay schedule scaled to their own peak learning rate,
and both apply decoupled weight decay (`p <- p - lr * (update + wd * p)`) where
`routing.weight_decay_mask` allows it.
"""

import jax
import ml_collections
import numpy as np
import optax

from errors import ConfigError
from optim import apollo, muon, normuon, routing, slimadam
from optim.config import OPTIMIZER_NAMES
from optim.schedules import learning_rate_schedule


def _path_lookup(table: dict):
    """A function `tree -> tree of table[path]`, usable on partition's masked sub-trees.

    `optax.partition` hands each inner transformation the parameters with the other group's
    leaves replaced by empty `MaskedNode`s, so per-leaf facts are looked up by path string
    rather than by zipping with a tree of the full structure.
    """

    def lookup(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: table[routing.path_to_str(path)], tree
        )

    return lookup


def _table(tree) -> dict:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {routing.path_to_str(path): value for path, value in leaves}


def _matrix_transform(optim_config, learning_rate, decay_mask, slimadam_axes):
    """The chosen matrix optimizer, already scaled by `-learning_rate` with weight decay."""
    name = optim_config.name
    section = optim_config[name]
    weight_decay = optim_config.weight_decay
    if name in ("muon", "normuon"):
        extra = {"beta2": section.beta2} if name == "normuon" else {}
        factory = muon.muon if name == "muon" else normuon.normuon
        return factory(
            learning_rate,
            momentum=section.momentum,
            nesterov=section.nesterov,
            ns_steps=section.ns_steps,
            ns_dtype=section.ns_dtype,
            scale=section.scale,
            weight_decay=weight_decay,
            weight_decay_mask=decay_mask,
            **extra,
        )
    if name in ("apollo", "apollo_mini"):
        return apollo.apollo(
            learning_rate,
            rank=section.rank,
            update_proj_gap=section.update_proj_gap,
            scale=section.scale,
            scale_type="channel" if name == "apollo" else "tensor",
            norm_growth_limit=section.norm_growth_limit,
            seed=section.seed,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=weight_decay,
            weight_decay_mask=decay_mask,
        )
    if name == "slimadam":
        return slimadam.slimadam(
            learning_rate,
            reduce_axes=slimadam_axes,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=weight_decay,
            weight_decay_mask=decay_mask,
        )
    raise ConfigError(f"optim.name must be one of {OPTIMIZER_NAMES}, got {name!r}")


def build(
    optim_config: ml_collections.ConfigDict,
    params,
    logical_axes,
    *,
    num_steps: int,
    slimadam_axes: dict | None = None,
) -> optax.GradientTransformation:
    """The model's optimizer. `params`/`logical_axes` only fix routing; no state is made.

    `slimadam_axes` (path string -> tuple of axes to average the second moment over, e.g.
    from `optim.slimadam.calibrate_axes`) overrides the rule-based choice for SlimAdam.
    """
    name = optim_config.name
    if name not in OPTIMIZER_NAMES:
        raise ConfigError(f"optim.name must be one of {OPTIMIZER_NAMES}, got {name!r}")
    if optim_config.grad_clip_norm < 0:
        raise ConfigError(f"optim.grad_clip_norm must be >= 0, got {optim_config.grad_clip_norm}")

    labels = routing.param_groups(optim_config, params, logical_axes)
    decay_mask = _path_lookup(_table(routing.weight_decay_mask(params, logical_axes)))

    adamw_lr = optim_config.learning_rate
    adamw_wd = optim_config.weight_decay
    if name != routing.ADAMW_LABEL:
        if optim_config.adamw_learning_rate >= 0:
            adamw_lr = optim_config.adamw_learning_rate
        if optim_config.adamw_weight_decay >= 0:
            adamw_wd = optim_config.adamw_weight_decay
    adamw = optax.adamw(
        learning_rate_schedule(optim_config, num_steps, peak_learning_rate=adamw_lr),
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
        weight_decay=adamw_wd,
        mask=decay_mask,
    )

    if name == routing.ADAMW_LABEL:
        body = adamw
    else:
        schedule = learning_rate_schedule(optim_config, num_steps)
        try:
            if name == "slimadam" and slimadam_axes is None:
                if optim_config.slimadam.rules == "snr":
                    raise ValueError(
                        "rules='snr' needs measured axes (slimadam_axes=...); "
                        "training.calibration.slimadam_axes measures them"
                    )
                slimadam_axes = slimadam.axes_from_rules(
                    params, logical_axes, optim_config.slimadam.rules
                )
            matrix = _matrix_transform(optim_config, schedule, decay_mask, slimadam_axes)
        except ValueError as error:  # a bad value in the optimizer's own section
            raise ConfigError(f"optim.{name}: {error}") from None
        body = optax.partition({name: matrix, routing.ADAMW_LABEL: adamw}, labels)

    if optim_config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), body)
    return body


def state_bytes(opt_state) -> int:
    """Bytes held by an optimizer state: every array leaf, PRNG keys and step counters
    included at their real size. Works on `jax.eval_shape` output (nothing is allocated)."""
    total = 0
    for leaf in jax.tree.leaves(opt_state):
        if not hasattr(leaf, "dtype"):
            total += np.asarray(leaf).nbytes  # a Python scalar kept in the state
            continue
        count = int(np.prod(leaf.shape, dtype=np.int64))
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            # A typed key is a handle on uint32 words; count the words it holds.
            words = jax.eval_shape(jax.random.key_data, leaf)
            total += int(np.prod(words.shape, dtype=np.int64)) * np.dtype(words.dtype).itemsize
        else:
            total += count * np.dtype(leaf.dtype).itemsize
    return total
