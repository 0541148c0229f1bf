"""Block sizes of the Pallas kernels: one validated record for both families, whose defaults
per platform live with each family (`linear_memory/block_sizes.py`,
`neural_memory/block_sizes.py`)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """chunk_size: tokens per chunk, a multiple of `multiple` (the family's tiling: 16 for
    the linear kernels, 8 for the deep-memory ones). num_warps / num_stages: Triton only
    (None lets Triton choose)."""

    chunk_size: int
    num_warps: int | None = None
    num_stages: int | None = None
    multiple: int = 8

    def __post_init__(self):
        if self.chunk_size < self.multiple or self.chunk_size % self.multiple:
            raise ValueError(
                f"chunk_size={self.chunk_size}, expected a multiple of {self.multiple}"
            )

    def with_chunk_size(self, chunk_size):
        return dataclasses.replace(self, chunk_size=chunk_size)
