"""Which parameter goes to which optimizer, and which parameters get weight decay.

Parameters arrive as a nested dict of arrays (from `nnx.to_pure_dict`) next to a dict of the
same structure whose leaves are `PartitionSpec`s of *logical* axis names. A leaf is routed to
the matrix optimizer (Muon, NorMuon, APOLLO, SlimAdam) iff

* after its leading stack axes (logical names in `STACK_AXES`: a stack of independent
  matrices, e.g. per-head memory weights `[heads, dk, dv]`) it still has >= 2 axes,
* it is not an embedding or output head (an axis named `vocab`, or `embedding` / `lm_head`
  in its path): those are not hidden matrices and Muon-style updates do not suit them;
  SlimAdam, a drop-in Adam with rules of its own for them, is the exception and takes them,
* it is not a convolution filter (an axis named `conv`),
* it is not a gate projection (its last axis is named `heads` or `experts`: one scalar per
  head or expert, such as Titans' θ/η/α, the linear memories' β and decay, ATLAS's Omega
  gate, Yaad's Huber threshold or MoM's router), which maps features to a handful of
  gate pre-activations rather than between feature spaces,
* it is not a memory's learned initial state (an axis named `memory_state`), and
* its path matches none of `optim.adamw_patterns`.

Everything else goes to AdamW. Every leaf gets exactly one label.

Weight decay (`weight_decay_mask`) applies to matrices only, and neither to gates nor to
memory initial states: decaying a gate pulls it to its bias's constant, and decaying a
memory's initial weights changes what the memory computes (Memora's are log-probabilities,
and for Moneta's ℓq-normalised memory shrinking them grows the effective weights).
"""

import re
from collections.abc import Sequence

import jax
import ml_collections
from jax.sharding import PartitionSpec

from errors import ConfigError

STACK_AXES = ("layers", "heads", "experts")
ADAMW_LABEL = "adamw"
# Optimizers that also train embeddings and heads (Adam variants with rules for them).
VOCAB_OPTIMIZERS = ("slimadam",)
# A leaf whose last axis has one of these names is a gate projection (module docstring).
GATE_AXES = ("heads", "experts")
# The logical axis name of a memory's learned initial state (`layers.neural_memory`).
MEMORY_STATE_AXIS = "memory_state"
# Learned token embeddings that are not the vocabulary's (Titans' persistent memory tokens).
PERSISTENT_AXIS = "persistent"


def path_to_str(path) -> str:
    """`("blocks", 0, "attn", "kernel")` keys as `"blocks/0/attn/kernel"`."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _is_spec_leaf(x) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def axis_names(spec: PartitionSpec | None, ndim: int) -> tuple[tuple[str, ...], ...]:
    """Logical names per array axis (a spec may be shorter than the array, or empty)."""
    entries = tuple(spec) if spec is not None else ()
    if len(entries) > ndim:
        raise ConfigError(f"logical axes {spec} have more entries than the array's {ndim} axes")
    names = []
    for entry in entries + (None,) * (ndim - len(entries)):
        if entry is None:
            names.append(())
        elif isinstance(entry, str):
            names.append((entry,))
        else:
            names.append(tuple(entry))
    return tuple(names)


def num_stack_axes(spec: PartitionSpec | None, ndim: int) -> int:
    """Number of leading axes that index a stack of independent matrices."""
    count = 0
    for names in axis_names(spec, ndim):
        if names and all(name in STACK_AXES for name in names):
            count += 1
        else:
            break
    return count


def compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ConfigError(f"optim.adamw_patterns: bad regex {pattern!r}: {error}") from None
    return compiled


def is_vocab_leaf(path: str, shape, spec) -> bool:
    """An embedding table or output head (by logical axis or by the model's naming)."""
    if any("vocab" in names for names in axis_names(spec, len(shape))):
        return True
    return "embedding" in path or "lm_head" in path


def is_gate_leaf(shape, spec) -> bool:
    """A projection to one value per head or expert (module docstring)."""
    names = axis_names(spec, len(shape))
    return len(shape) - num_stack_axes(spec, len(shape)) >= 2 and any(
        name in GATE_AXES for name in names[-1]
    )


def is_memory_state_leaf(shape, spec) -> bool:
    return any(MEMORY_STATE_AXIS in names for names in axis_names(spec, len(shape)))


def is_matrix_leaf(
    path: str, shape, spec, patterns: Sequence[re.Pattern], *, take_vocab: bool = False
) -> bool:
    """The routing rule of the module docstring, for one leaf."""
    ndim = len(shape)
    if ndim - num_stack_axes(spec, ndim) < 2:
        return False
    if not take_vocab and is_vocab_leaf(path, shape, spec):
        return False
    names = axis_names(spec, ndim)
    if any("conv" in axis or PERSISTENT_AXIS in axis for axis in names):
        return False  # a convolution's taps or a set of tokens: not a map between features
    if is_gate_leaf(shape, spec) or is_memory_state_leaf(shape, spec):
        return False
    return not any(pattern.search(path) for pattern in patterns)


def _specs_like(params, logical_axes):
    """The logical-axes tree aligned leaf-for-leaf with `params` (None where absent)."""
    if logical_axes is None:
        return jax.tree.map(lambda _: None, params)
    try:
        return jax.tree.map(lambda _, spec: spec, params, logical_axes, is_leaf=_is_spec_leaf)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"logical_axes does not match the parameter tree: {error}") from None


def param_groups(optim_config: ml_collections.ConfigDict, params, logical_axes):
    """Labels tree (same structure as `params`): `optim_config.name` or `"adamw"` per leaf."""
    patterns = compile_patterns(optim_config.adamw_patterns)
    specs = _specs_like(params, logical_axes)
    matrix_label = optim_config.name
    take_vocab = matrix_label in VOCAB_OPTIMIZERS

    def label(path, leaf, spec):
        if matrix_label == ADAMW_LABEL:
            return ADAMW_LABEL
        if is_matrix_leaf(path_to_str(path), leaf.shape, spec, patterns, take_vocab=take_vocab):
            return matrix_label
        return ADAMW_LABEL

    return jax.tree_util.tree_map_with_path(label, params, specs)


def weight_decay_mask(params, logical_axes=None):
    """True where decoupled weight decay applies: not on norms, biases, (stacks of) 1-D
    params, gate projections or memory initial states (module docstring)."""
    specs = _specs_like(params, logical_axes)

    def decays(path, leaf, spec):
        path_str = path_to_str(path)
        if path_str.rsplit("/", 1)[-1] == "bias" or "norm" in path_str:
            return False
        if is_gate_leaf(leaf.shape, spec) or is_memory_state_leaf(leaf.shape, spec):
            return False
        return leaf.ndim - num_stack_axes(spec, leaf.ndim) >= 2

    return jax.tree_util.tree_map_with_path(decays, params, specs)


def spec_tree(params, logical_axes):
    """Public alias of the aligned logical-axes tree (optimizers that read roles use it)."""
    return _specs_like(params, logical_axes)
