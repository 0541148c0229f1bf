"""Pre-norm blocks around the matrix-memory mixers, registered as block kinds

    "linear_attention", "gla", "deltanet", "gdn"   (`layers.linear_memory.LinearMemory`)
    "mom"                                           (`layers.mixture_of_memories`)

Each is x + Mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(.)), like `models.lm.TransformerBlock`.
Options (`model.<kind>`): num_heads (0 = model.num_heads), head_dim (0 = the model's head
dim), expand_v (value dim = expand_v * head_dim), conv_size (short conv taps, 0 = none),
chunk_size (of the chunked recurrence), impl (recurrence implementation, see
`pallas_kernels.linear_memory`); "linear_attention" adds feature_map (what q and k go
through: "elu1", elu + 1, its default, or "silu_l2", Gated DeltaNet's) and normalize (divide
by z_t^T q_t, default True: Katharopoulos et al.'s normaliser); "mom" adds num_memories,
top_k, shared_memory, aux_loss_coef and rule (the memories' recurrence, default
"gated_deltanet").

Decoding: `init_cache(batch_size, max_length)` and `extend(x, cache, *, positions)` (the
memory state does not grow, so max_length and positions are not needed).
"""

import jax.numpy as jnp
from flax import nnx

from errors import ConfigError
from layers.linear_memory import FEATURE_MAPS, RULES, LinearMemory
from layers.mixture_of_memories import MixtureOfMemories
from layers.mlp import SwiGLU
from layers.norms import RMSNorm
from models.registry import (
    compute_dtype_of,
    head_dim_of,
    init_std_of,
    mlp_dim_of,
    register_block,
    residual_out_init_std,
)
from pallas_kernels.dispatch import IMPLS


class MemoryBlock(nnx.Module):
    """Pre-norm residual block around a memory mixer with the interface
    `mixer(x, *, segment_ids) -> (y, aux)`, `mixer.init_cache(B)`, `mixer.extend(x, cache)`."""

    def __init__(self, model_config, mixer: nnx.Module, *, rngs: nnx.Rngs):
        d_model, dtype = model_config.d_model, compute_dtype_of(model_config)
        self.mixer_norm = RMSNorm(d_model, eps=model_config.norm_eps, dtype=dtype, rngs=rngs)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, eps=model_config.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = SwiGLU(
            d_model,
            mlp_dim_of(model_config),
            init_std=init_std_of(model_config),
            out_init_std=residual_out_init_std(model_config),
            dtype=dtype,
            rngs=rngs,
        )

    def _mlp(self, x):
        return x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)

    def __call__(self, x, *, positions, segment_ids=None):
        del positions  # a recurrent memory knows the order without them
        mixed, aux = self.mixer(self.mixer_norm(x), segment_ids=segment_ids)
        return self._mlp(x + mixed.astype(jnp.float32)), aux

    def memory_writes(self, x, *, positions):
        del positions
        return self.mixer.writes(self.mixer_norm(x))

    def init_cache(self, batch_size: int, max_length: int):
        del max_length  # the state has a fixed size
        return self.mixer.init_cache(batch_size)

    def extend(self, x, cache, *, positions):
        del positions
        mixed, cache = self.mixer.extend(self.mixer_norm(x), cache)
        return self._mlp(x + mixed.astype(jnp.float32)), cache


def _check_options(model_config, block_config) -> dict:
    """The LinearMemory keyword arguments shared by every kind (ConfigError without prefix)."""
    for key, minimum in (("num_heads", 0), ("head_dim", 0), ("expand_v", 1), ("conv_size", 0)):
        if block_config[key] < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}, got {block_config[key]}")
    if block_config.chunk_size < 1:
        raise ConfigError(f"chunk_size: must be >= 1, got {block_config.chunk_size}")
    if block_config.impl not in IMPLS:
        raise ConfigError(f"impl: {block_config.impl!r} is not one of {', '.join(IMPLS)}")
    return dict(
        num_heads=block_config.num_heads or model_config.num_heads,
        head_dim=block_config.head_dim or head_dim_of(model_config),
        expand_v=block_config.expand_v,
        conv_size=block_config.conv_size,
        chunk_size=block_config.chunk_size,
        impl=block_config.impl,
        norm_eps=model_config.norm_eps,
        init_std=init_std_of(model_config),
        out_init_std=residual_out_init_std(model_config),
        dtype=compute_dtype_of(model_config),
    )


MEMORY_DEFAULTS = {
    "num_heads": 0,
    "head_dim": 0,
    "expand_v": 1,
    "conv_size": 4,
    "chunk_size": 64,
    "impl": "auto",
}


def _check_readout(block_config) -> dict:
    """feature_map and normalize, for the kinds that have them (ConfigError without prefix)."""
    if "feature_map" not in block_config:
        return {}
    if block_config.feature_map not in FEATURE_MAPS:
        known = ", ".join(FEATURE_MAPS)
        raise ConfigError(f"feature_map: {block_config.feature_map!r} is not one of {known}")
    return dict(feature_map=block_config.feature_map, normalize=block_config.normalize)


def _linear_memory_block(kind, rule, **defaults):
    def factory(model_config, block_config, *, layer_index, rngs):
        del layer_index  # every layer of a kind is built the same way
        mixer = LinearMemory(
            model_config.d_model,
            rule=rule,
            **_check_options(model_config, block_config),
            **_check_readout(block_config),
            rngs=rngs,
        )
        return MemoryBlock(model_config, mixer, rngs=rngs)

    register_block(kind, defaults={**MEMORY_DEFAULTS, **defaults})(factory)


# Linear attention as Katharopoulos et al. define it: a positive feature map and the
# normaliser (feature_map="silu_l2", normalize=False gives the un-normalised memory).
_linear_memory_block("linear_attention", "linear_attention", feature_map="elu1", normalize=True)
_linear_memory_block("gla", "gla")
_linear_memory_block("deltanet", "deltanet")
_linear_memory_block("gdn", "gated_deltanet")


@register_block(
    "mom",
    defaults={
        **MEMORY_DEFAULTS,
        "num_memories": 4,
        "top_k": 2,
        "shared_memory": True,
        "aux_loss_coef": 0.01,
        "rule": "gated_deltanet",
    },
)
def _mom_block(model_config, block_config, *, layer_index, rngs):
    del layer_index
    options = _check_options(model_config, block_config)
    if block_config.rule not in RULES:
        raise ConfigError(f"rule: {block_config.rule!r} is not one of {', '.join(RULES)}")
    if block_config.num_memories < 1:
        raise ConfigError(f"num_memories: must be >= 1, got {block_config.num_memories}")
    if not 1 <= block_config.top_k <= block_config.num_memories:
        raise ConfigError(
            f"top_k: must be in [1, num_memories={block_config.num_memories}], "
            f"got {block_config.top_k}"
        )
    if block_config.aux_loss_coef < 0:
        raise ConfigError(f"aux_loss_coef: must be >= 0, got {block_config.aux_loss_coef}")
    mixer = MixtureOfMemories(
        model_config.d_model,
        num_memories=block_config.num_memories,
        top_k=block_config.top_k,
        shared_memory=block_config.shared_memory,
        aux_loss_coef=block_config.aux_loss_coef,
        rule=block_config.rule,
        **options,
        rngs=rngs,
    )
    return MemoryBlock(model_config, mixer, rngs=rngs)
