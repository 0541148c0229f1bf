"""Block sizes of the linear-memory Pallas kernels, with per-platform defaults.

The kernels keep one whole `[Dk, Dv]` state per (batch, head) on chip and walk the chunks
in order, so the only tile to choose is the chunk length (plus Triton's warps / stages). The
chunk is the C of the UT transform: a multiple of 16, so bf16 blocks tile on TPU and
Triton's dots have K, M >= 16.
"""

from pallas_kernels.block_sizes import BlockSizes

# TPU: 64-row chunks keep the [C, C] matrices (UT inverse, decays) at one MXU pass per
# matmul on v5e/v6e. GPU: 64 rows, 4 warps as flash-linear-attention's chunk kernels use.
DEFAULTS = {
    "tpu": BlockSizes(chunk_size=64, multiple=16),
    "gpu": BlockSizes(chunk_size=64, num_warps=4, num_stages=1, multiple=16),
}


def default_block_sizes(platform, chunk_size=None):
    """Defaults for "tpu" / "gpu", with the chunk size overridden when given."""
    sizes = DEFAULTS[platform]
    return sizes if chunk_size is None else sizes.with_chunk_size(chunk_size)
