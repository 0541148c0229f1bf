"""Block sizes of the linear-memory Pallas kernels, with per-platform defaults.

The kernels keep one whole `[Dk, Dv]` state per (batch, head) on chip and walk the chunks
in order, so the only tile to choose is the chunk length (plus Triton's warps / stages).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """chunk_size: tokens per chunk (the C of the UT transform; a multiple of 16, so bf16
    blocks tile on TPU and Triton's dots have K, M >= 16). num_warps / num_stages: Triton
    only (None lets Triton choose)."""

    chunk_size: int = 64
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        if self.chunk_size < 16 or self.chunk_size % 16:
            raise ValueError(f"chunk_size={self.chunk_size}, expected a multiple of 16")


# TPU: 64-row chunks keep the [C, C] matrices (UT inverse, decays) at one MXU pass per
# matmul on v5e/v6e. GPU: 64 rows, 4 warps as flash-linear-attention's chunk kernels use.
DEFAULTS = {
    "tpu": BlockSizes(chunk_size=64),
    "gpu": BlockSizes(chunk_size=64, num_warps=4, num_stages=1),
}


def default_block_sizes(platform, chunk_size=None):
    """Defaults for "tpu" / "gpu", with the chunk size overridden when given."""
    sizes = DEFAULTS[platform]
    if chunk_size is not None:
        sizes = dataclasses.replace(sizes, chunk_size=chunk_size)
    return sizes
