"""Memory Caching blocks (Behrouz et al., "Memory Caching: RNNs with Growing Memory";
`layers.memory_caching`), registered as block kinds

    "gdn_mc"   Gated DeltaNet (`layers.linear_memory`, as the "gdn" block) with its state
               S [B, H, Dk, Dv] cached at every segment end
    "lmm_mc"   the Titans neural memory (`layers.neural_memory`, as the "lmm" block) with its
               MLP weights cached at every segment end

Each is x + Mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(.)), like the "gdn" and "lmm" blocks.
Options (`model.<kind>`): the wrapped block's (`models.matrix_memory_blocks.MEMORY_DEFAULTS`,
`models.titans.MEMORY_DEFAULTS`) plus segment_size (tokens per cached segment, default 64;
for lmm_mc a multiple of chunk_size), aggregation ("grm", the paper's gated residual memory,
the default; "ssc", sparse selective caching; "residual") and top_k (cached segments ssc
keeps, default 2). Packed sequences (segment_ids) are refused with a DataError.

Decoding caches one state per segment: ceil(max_length / segment_size) slots.
`memory_writes` is the wrapped memory's (caching changes what is read, not what is written).
"""

from errors import ConfigError
from layers.linear_memory import LinearMemory
from layers.memory_caching import AGGREGATIONS, GatedDeltaNetMemoryCaching, NeuralMemoryCaching
from models import titans
from models.matrix_memory_blocks import MEMORY_DEFAULTS, MemoryBlock, _check_options
from models.registry import init_std_of, register_block, residual_out_init_std

CACHING_DEFAULTS = {"segment_size": 64, "aggregation": "grm", "top_k": 2}


class MemoryCachingBlock(MemoryBlock):
    """`MemoryBlock` around a caching mixer, whose cache size depends on max_length."""

    def init_cache(self, batch_size: int, max_length: int):
        return self.mixer.init_cache(batch_size, max_length)


def _caching_options(model_config, block_config) -> dict:
    """segment_size, aggregation, top_k (ConfigError naming the option, without prefix)."""
    if block_config.segment_size < 1:
        raise ConfigError(f"segment_size: must be >= 1, got {block_config.segment_size}")
    if block_config.aggregation not in AGGREGATIONS:
        known = ", ".join(AGGREGATIONS)
        raise ConfigError(f"aggregation: {block_config.aggregation!r} is not one of {known}")
    if block_config.top_k < 1:
        raise ConfigError(f"top_k: must be >= 1, got {block_config.top_k}")
    return dict(
        segment_size=block_config.segment_size,
        aggregation=block_config.aggregation,
        top_k=block_config.top_k,
        init_std=init_std_of(model_config),
    )


@register_block("gdn_mc", defaults={**MEMORY_DEFAULTS, **CACHING_DEFAULTS})
def _gdn_mc_block(model_config, block_config, *, layer_index, rngs):
    del layer_index  # every layer of a kind is built the same way
    caching = _caching_options(model_config, block_config)
    memory = LinearMemory(
        model_config.d_model,
        rule="gated_deltanet",
        **_check_options(model_config, block_config),
        rngs=rngs,
    )
    mixer = GatedDeltaNetMemoryCaching(memory, **caching, rngs=rngs)
    return MemoryCachingBlock(model_config, mixer, rngs=rngs)


@register_block("lmm_mc", defaults={**titans.MEMORY_DEFAULTS, **CACHING_DEFAULTS})
def _lmm_mc_block(model_config, block_config, *, layer_index, rngs):
    del layer_index
    caching = _caching_options(model_config, block_config)
    if block_config.chunk_size >= 1 and block_config.segment_size % block_config.chunk_size:
        raise ConfigError(
            f"segment_size: must be a multiple of chunk_size={block_config.chunk_size}, "
            f"got {block_config.segment_size}"
        )
    memory = titans.build_memory(
        model_config, block_config, residual_out_init_std(model_config), rngs
    )
    mixer = NeuralMemoryCaching(memory, **caching, rngs=rngs)
    return MemoryCachingBlock(model_config, mixer, rngs=rngs)
