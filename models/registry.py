"""Name -> constructor tables for whole models (`model.name`) and block kinds
(`model.block_pattern`).

Adding a block kind is one file holding a factory decorated with
`@register_block("kind", defaults={...})`, imported from `models/__init__.py`. The
`defaults` become the `model.<kind>` config sub-section (the kind's own options), and the
factory is called as `factory(model_config, block_config, layer_index=i, rngs=rngs)`, where
`block_config` is that sub-section. It returns an `nnx.Module` with the block interface

    block(x [B, T, D] float32, *, positions [B, T] int32, segment_ids [B, T] int32 | None)
        -> (y [B, T, D] float32, aux: dict[str, scalar])

(a pre-norm residual block; aux keys starting with "aux_loss/" are added to the training
loss, the others are logged as metrics), and for recurrent decoding

    block.init_cache(batch_size, max_length) -> cache (a pytree of arrays)
    block.extend(x [B, T, D], cache, *, positions [B, T]) -> (y [B, T, D], new_cache)

where `extend` processes T new tokens that follow the cached ones (T = 1 decodes, T = the
prompt length prefills) and must equal the full forward on the whole sequence, and for the
evals (the probe contract)

    block.memory_writes(x [B, T, D], *, positions [B, T]) -> a `layers.memory_writes` record

saying what the block's memory writes reading x (or `NoMemory(reason)`), so that
`evals.memory_behaviour` can replay any block without knowing its class.

A factory raises `ConfigError` naming its option ("window: must be >= 0"); `build_block`
prefixes the sub-section ("model.swa.window: ...") unless the message already names a key
of `model` itself.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import nnx

from errors import ConfigError
from layers.mlp import swiglu_hidden_dim

AUX_LOSS_PREFIX = "aux_loss/"

_MODELS: dict[str, Callable[..., nnx.Module]] = {}
_BLOCKS: dict[str, Callable[..., nnx.Module]] = {}
_BLOCK_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_model(name: str):
    """Decorator: register `factory(model_config, *, rngs) -> nnx.Module` as `model.name`."""

    def decorate(factory):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = factory
        return factory

    return decorate


def register_block(kind: str, *, defaults: Mapping[str, Any] | None = None):
    """Decorator: register a block factory for `kind` with its config sub-section defaults."""

    def decorate(factory):
        if kind in _BLOCKS:
            raise ValueError(f"block kind {kind!r} is registered twice")
        _BLOCKS[kind] = factory
        _BLOCK_DEFAULTS[kind] = dict(defaults or {})
        return factory

    return decorate


def registered_models() -> tuple[str, ...]:
    return tuple(sorted(_MODELS))


def registered_blocks() -> tuple[str, ...]:
    return tuple(sorted(_BLOCKS))


def block_default_config(kind: str) -> ml_collections.ConfigDict:
    """The `model.<kind>` sub-section with the kind's registered defaults."""
    return ml_collections.ConfigDict(dict(_BLOCK_DEFAULTS[kind]))


def build_model(model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    name = model_config.name
    if name not in _MODELS:
        known = ", ".join(registered_models())
        raise ConfigError(f"model.name: unknown model {name!r} (registered: {known})")
    return _MODELS[name](model_config, rngs=rngs)


def _block_config(model_config, kind: str) -> ml_collections.ConfigDict:
    """Registered defaults overlaid with `model.<kind>` (which may be absent)."""
    block_config = block_default_config(kind)
    given = model_config.get(kind)
    if given is None:
        return block_config
    for key, value in given.items():
        if key not in block_config:
            known = ", ".join(sorted(block_config)) or "none"
            raise ConfigError(f"model.{kind}.{key}: unknown option (known: {known})")
        try:
            block_config[key] = value
        except TypeError as error:
            raise ConfigError(f"model.{kind}.{key}: {error}") from None
    return block_config


def build_block(
    kind: str, model_config: ml_collections.ConfigDict, *, layer_index: int, rngs: nnx.Rngs
) -> nnx.Module:
    if kind not in _BLOCKS:
        known = ", ".join(registered_blocks())
        raise ConfigError(
            f"model.block_pattern: unknown block kind {kind!r} in layer {layer_index} "
            f"(registered: {known})"
        )
    block_config = _block_config(model_config, kind)
    try:
        return _BLOCKS[kind](model_config, block_config, layer_index=layer_index, rngs=rngs)
    except ConfigError as error:  # a factory names its option; say which sub-section
        message = str(error)
        prefix = "" if message.startswith("model.") else f"model.{kind}."
        raise ConfigError(prefix + message) from None


# Readers of the shared `model` section that every block factory needs.

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype_of(model_config) -> Any:
    """`model.compute_dtype` as a jnp dtype (parameters are always float32)."""
    name = model_config.compute_dtype
    if name not in _COMPUTE_DTYPES:
        known = ", ".join(_COMPUTE_DTYPES)
        raise ConfigError(f"model.compute_dtype: {name!r} is not one of {known}")
    return _COMPUTE_DTYPES[name]


def head_dim_of(model_config) -> int:
    """`model.head_dim`, or d_model // num_heads when it is 0."""
    if model_config.num_heads <= 0:
        raise ConfigError(f"model.num_heads: must be positive, got {model_config.num_heads}")
    if model_config.head_dim > 0:
        return model_config.head_dim
    if model_config.d_model % model_config.num_heads:
        raise ConfigError(
            f"model.num_heads: d_model={model_config.d_model} is not divisible by "
            f"num_heads={model_config.num_heads} (or set model.head_dim)"
        )
    return model_config.d_model // model_config.num_heads


def mlp_dim_of(model_config) -> int:
    """`model.mlp_dim`, or the SwiGLU default (~8/3 d_model, multiple of 32) when it is 0."""
    if model_config.mlp_dim > 0:
        return model_config.mlp_dim
    return swiglu_hidden_dim(model_config.d_model)


def init_std_of(model_config) -> float:
    """Init std of embeddings and projections: `model.init_std`, or 1/sqrt(d_model) when it
    is 0 (the default).

    1/sqrt(d_model) is the fan-in ("LeCun") scale of a projection from the residual stream:
    its inputs are RMS-normalised, so every projected feature (a query, a key, a gate's
    pre-activation) starts with unit variance whatever the width, and the tied output head
    starts with unit-variance logits. A fixed 0.02 (GPT-2's value, which is 1/sqrt(d) only
    near d = 2500) leaves a d = 64 model's attention logits at std ~0.03 and its gates nearly
    constant, so the key-matching circuit's gradient starts quadratically small: MQAR stalled
    on the pre-induction plateau for 1,700 steps at 0.02 and was solved at 0.1 (issue 15).
    """
    if model_config.init_std < 0:
        raise ConfigError(
            f"model.init_std: must be >= 0 (0 = 1/sqrt(d_model)), got {model_config.init_std}"
        )
    return model_config.init_std or model_config.d_model**-0.5


def residual_out_init_std(model_config) -> float:
    """Init std of projections that write into the residual stream: init_std / sqrt(2 L)
    (GPT-2, Radford et al. 2019), so the stream's variance at init does not grow with depth."""
    return init_std_of(model_config) / (2 * model_config.num_layers) ** 0.5
