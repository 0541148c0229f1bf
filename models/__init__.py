"""Whole networks, built by name from the `model` config section.

Importing this package registers every model and block kind; a new block kind's module is
imported here (see `models.registry` for how to add one).
"""

import ml_collections

from models import (  # noqa: F401  (importing them registers the block kinds)
    lm,
    matrix_memory_blocks,
    memory_caching_blocks,
    miras,
    registry,
    titans,
    titans_mac,
)
from models.registry import (
    build_block,
    build_model,
    register_block,
    register_model,
    registered_blocks,
    registered_models,
)

__all__ = [
    "build_block",
    "build_model",
    "default_config",
    "register_block",
    "register_model",
    "registered_blocks",
    "registered_models",
]


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `model` section. Keys and types are fixed; the run validator relies on it.

    name:            registered model ("lm").
    vocab_size:      set by the run from the data.
    d_model:         width of the residual stream.
    num_layers:      number of blocks.
    num_heads:       attention heads (also the default head count of other block kinds).
    head_dim:        per-head width; 0 = d_model // num_heads.
    mlp_dim:         SwiGLU hidden width; 0 = 8/3 * d_model rounded to a multiple of 32.
    block_pattern:   block kinds, repeated: layer i is block_pattern[i % len(block_pattern)].
    tie_embeddings:  the output head is the transposed input embedding.
    norm_eps:        RMSNorm epsilon.
    init_std:        std of the normal init of embeddings and projections; 0 (default) =
                     1/sqrt(d_model), the width-aware fan-in scale (`models.registry.init_std_of`).
                     Projections into the residual stream use init_std / sqrt(2 * num_layers).
    compute_dtype:   "float32" or "bfloat16" for matmuls; parameters, norms, softmax and the
                     residual stream stay float32.
    remat:           recompute each block in the backward pass (nnx.remat) to save memory.
    loss_chunk_size: 0 = plain loss; > 0 = cross-entropy over sequence chunks of this length,
                     never materialising the full [B, T, vocab] logits.
    <kind>:          one sub-section per registered block kind with that kind's options, e.g.
      attention:       window (0 = full causal), rope_theta, num_kv_heads (0 = num_heads; GQA).
      swa:             the attention block with a sliding window (default 256 tokens).
    """
    config = ml_collections.ConfigDict()
    config.name = "lm"
    config.vocab_size = 256
    config.d_model = 128
    config.num_layers = 2
    config.num_heads = 4
    config.head_dim = 0
    config.mlp_dim = 0
    config.block_pattern = ("attention",)
    config.tie_embeddings = True
    config.norm_eps = 1e-6
    config.init_std = 0.0  # 0: 1/sqrt(d_model) (models.registry.init_std_of)
    config.compute_dtype = "float32"
    config.remat = False
    config.loss_chunk_size = 0
    for kind in registered_blocks():
        config[kind] = registry.block_default_config(kind)
    return config
