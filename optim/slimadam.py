"""SlimAdam (Kalra et al. 2025, "When Can You Get Away with Low Memory Adam?").

Adam whose second moment is averaged along chosen axes K of each parameter (kept with
keepdims, so it broadcasts back; reference `SlimAdamW.step`):

    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) mean_K(g^2)           v has size 1 along every axis in K
    W <- W (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

K per parameter comes from the paper's rules by layer role (Table 1, reference
`DEFAULT_COMPRESSION_RULES`, written there for PyTorch `[fan_out, fan_in]` weights and
translated here to Flax `[fan_in, fan_out]`, axis -2 = fan_in, axis -1 = fan_out):

    queries, keys          fan_in   -> (-2,)
    values, outputs, MLP   fan_out  -> (-1,)
    embedding [vocab, embed], head [embed, vocab]: the embed axis
    norms, and any role the rules do not know: not compressed

or from `calibrate_axes`, which measures the signal-to-noise ratio of Adam's second moment
along each candidate K (reference `snr_utils.estimate_snr` and `get_rules_slim_snr.py`).
"""

import re
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim import routing

RULES = ("paper", "none")
FAN_IN, FAN_OUT = (-2,), (-1,)
# (role, path regex, axes). Searched in order on the parameter path; first match wins.
ROLE_PATTERNS = (
    ("norm", r"norm|(^|/)ln_", None),
    ("query", r"(^|/|_)(q|q_proj|query|wq)(/|$)", FAN_IN),
    ("key", r"(^|/|_)(k|k_proj|key|wk)(/|$)", FAN_IN),
    ("value", r"(^|/|_)(v|v_proj|value|wv)(/|$)", FAN_OUT),
    ("output", r"(^|/|_)(o|out|o_proj|out_proj|output_proj|wo)(/|$)", FAN_OUT),
    ("mlp", r"mlp|ffn|feed_forward|(^|/)(up|gate|down|fc1|fc2|w1|w2|w3)(_proj)?(/|$)", FAN_OUT),
)


class SlimAdamState(NamedTuple):
    count: jnp.ndarray
    mu: optax.Updates
    nu: optax.Updates  # second moment, size 1 along the compressed axes


def _embed_axis(shape, spec) -> tuple[int, ...] | None:
    """The axis named 'embed' of an embedding/head, from its logical axes (None: unknown)."""
    names = routing.axis_names(spec, len(shape))
    for axis, entry in enumerate(names):
        if "embed" in entry:
            return (axis - len(shape),)
    return None


def rule_axes(path: str, shape, spec) -> tuple[int, ...] | None:
    """The paper's compression axes for one parameter (negative axes), or None."""
    if len(shape) - routing.num_stack_axes(spec, len(shape)) < 2:
        return None
    is_vocab = any("vocab" in names for names in routing.axis_names(spec, len(shape)))
    if is_vocab or "embedding" in path or "lm_head" in path:
        axes = _embed_axis(shape, spec)
        if axes is not None:
            return axes
        return FAN_OUT if "embedding" in path else FAN_IN  # [vocab, embed] / [embed, vocab]
    for _, pattern, axes in ROLE_PATTERNS:
        if re.search(pattern, path):
            return axes
    return None


def axes_from_rules(params, logical_axes, rules: str = "paper") -> dict:
    """Path string -> compression axes (or None) for every leaf, by the named rules."""
    if rules not in RULES:
        raise ValueError(f"rules must be one of {RULES}, got {rules!r}")
    specs = routing.spec_tree(params, logical_axes)
    table = {}

    def visit(path, leaf, spec):
        path_str = routing.path_to_str(path)
        table[path_str] = rule_axes(path_str, leaf.shape, spec) if rules == "paper" else None

    jax.tree_util.tree_map_with_path(visit, params, specs)
    return table


def _compressed_shape(shape, axes) -> tuple[int, ...]:
    if axes is None:
        return tuple(shape)
    keep = {axis % len(shape) for axis in axes}
    return tuple(1 if i in keep else size for i, size in enumerate(shape))


def slimadam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    reduce_axes: dict,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask=None,
) -> optax.GradientTransformation:
    """SlimAdam with decoupled weight decay. `reduce_axes`: path string -> axes or None
    (paths absent from it keep a full second moment)."""

    def axes_of(path, leaf):
        axes = reduce_axes.get(routing.path_to_str(path))
        if axes is not None and any(not -leaf.ndim <= a < leaf.ndim for a in axes):
            raise ValueError(f"slimadam axes {axes} out of range for {routing.path_to_str(path)}")
        return axes

    def init_fn(params):
        return SlimAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree_util.tree_map_with_path(
                lambda path, p: jnp.zeros(_compressed_shape(p.shape, axes_of(path, p)), p.dtype),
                params,
            ),
        )

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda g, m: b1 * m + (1.0 - b1) * g, updates, state.mu)

        def second_moment(path, g, v):
            axes = axes_of(path, g)
            squared = g * g if axes is None else jnp.mean(g * g, axis=axes, keepdims=True)
            return b2 * v + (1.0 - b2) * squared

        nu = jax.tree_util.tree_map_with_path(second_moment, updates, state.nu)
        t = count.astype(jnp.float32)
        direction = jax.tree.map(
            lambda m, v: (m / (1.0 - b1**t)) / (jnp.sqrt(v / (1.0 - b2**t)) + eps), mu, nu
        )
        return direction, SlimAdamState(count, mu, nu)

    return optax.chain(
        optax.GradientTransformation(init_fn, update_fn),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def snr(second_moment: np.ndarray, axes: tuple[int, ...]) -> float:
    """Mean over the other axes of `mean_K(v)^2 / var_K(v)` (reference `estimate_snr`)."""
    v = np.asarray(second_moment, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.mean(v, axis=axes) ** 2 / np.var(v, axis=axes)
    finite = np.isfinite(ratio)
    return float(ratio[finite].mean()) if finite.any() else float("nan")


def calibrate_axes(
    gradient_batches: Iterable,
    logical_axes=None,
    *,
    b2: float = 0.95,
    snr_cutoff: float = 1.0,
) -> dict:
    """Pick compression axes per leaf from a short run's gradients.

    Accumulates Adam's second moment `v` over the gradient trees given, then for each leaf
    with >= 2 matrix axes (norms excluded) measures `snr(v, K)` for K in {fan_in, fan_out,
    both} and keeps the K of highest SNR among those above `snr_cutoff` (None if none is).
    Returns path string -> axes, the `slimadam_axes` argument of `optim.build`.
    """
    second_moments, count = None, 0
    for grads in gradient_batches:
        squared = jax.tree.map(lambda g: np.asarray(g, np.float64) ** 2, grads)
        if second_moments is None:
            second_moments = jax.tree.map(lambda s: (1.0 - b2) * s, squared)
        else:
            second_moments = jax.tree.map(
                lambda v, s: b2 * v + (1.0 - b2) * s, second_moments, squared
            )
        count += 1
    if count == 0:
        raise ValueError("calibrate_axes needs at least one gradient batch")
    specs = routing.spec_tree(second_moments, logical_axes)
    candidates = [FAN_IN, FAN_OUT, FAN_IN + FAN_OUT]
    choice = {}

    def choose(path, v, spec):
        path_str = routing.path_to_str(path)
        matrix_dims = v.ndim - routing.num_stack_axes(spec, v.ndim)
        if matrix_dims < 2 or re.search(ROLE_PATTERNS[0][1], path_str):
            choice[path_str] = None
            return
        scores = {axes: snr(v, axes) for axes in candidates}
        above = {axes: s for axes, s in scores.items() if np.isfinite(s) and s > snr_cutoff}
        choice[path_str] = max(above, key=above.get) if above else None

    jax.tree_util.tree_map_with_path(choose, second_moments, specs)
    return choice
