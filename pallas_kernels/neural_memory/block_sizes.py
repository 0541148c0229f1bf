"""Block sizes of the deep-memory Pallas kernels, with per-platform defaults.

The kernels keep one whole state (W1, W2^T, S1, S2^T, each `[D, E·D]`) per (batch, head) on
chip and walk the chunks in order. Unlike the linear family, the chunk size is not a free
tile: it changes the result (every gradient in a chunk is taken at the chunk-start memory,
Titans eqs. 16-18), so it always comes from the caller (a multiple of 8, Mosaic's sublane
tile; `kernel_api` asks more per platform and dtype); only Triton's warps / stages are
tuning knobs here.
"""

from pallas_kernels.block_sizes import BlockSizes

# GPU: 4 warps (128 threads) hold the carried state in registers up to D = 32 (kernel gpu.py);
# one stage, as the chunk loop is sequential and software pipelining buys nothing.
DEFAULTS = {
    "tpu": BlockSizes(chunk_size=16),
    "gpu": BlockSizes(chunk_size=16, num_warps=4, num_stages=1),
}


def default_block_sizes(platform, chunk_size):
    """Defaults for "tpu" / "gpu" with the caller's chunk size."""
    return DEFAULTS[platform].with_chunk_size(chunk_size)
