"""Pre-tokenized corpora: raw `.bin` files (nanoGPT style) and `.npy` arrays, memory-mapped.

Files are opened with `np.memmap` / `np.load(mmap_mode="r")` and only the windows a batch
needs are read, so a corpus far larger than memory works. Several files are concatenated in
sorted order (see `data.files.list_files`).

What is checked, and when:
- on open: the file is non-empty; a `.bin` size is a multiple of the dtype size; a `.npy`
  is a 1-D integer array; the first `SCAN_TOKENS` tokens of each file are in
  `[0, vocab_size)` (a chunked scan of the memory map, a fraction of a second);
- on every read: the tokens of the window being read are in `[0, vocab_size)`, so a bad
  token beyond the scanned prefix is reported (with its file and index) when first reached.
"""

import numpy as np

from data.files import list_files
from data.windows import TokenPart, TokenStream, check_token_range
from errors import DataError

TOKEN_SUFFIXES = (".bin", ".npy")
SCAN_TOKENS = 1 << 26  # 64 Mi tokens per file are scanned up front
SCAN_CHUNK = 1 << 22  # chunked so a scan never materialises more than 32 MiB at once


def open_token_file(file: str, token_dtype: str) -> np.ndarray:
    """Memory-maps one token file as a 1-D integer array (DataError if it cannot be one)."""
    if file.endswith(".npy"):
        try:
            tokens = np.load(file, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise DataError(f"{file}: not a readable .npy array ({error})") from error
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(
                f"{file}: expected a 1-D integer token array, got {tokens.dtype} {tokens.shape}"
            )
        if tokens.size == 0:
            raise DataError(f"{file}: token file is empty")
        return tokens
    dtype = np.dtype(token_dtype)
    with open(file, "rb") as handle:
        size = handle.seek(0, 2)
    if size == 0:
        raise DataError(f"{file}: token file is empty")
    if size % dtype.itemsize:
        raise DataError(
            f"{file}: size {size} bytes is not a multiple of {dtype.itemsize} "
            f"(data.token_dtype={token_dtype})"
        )
    return np.memmap(file, dtype=dtype, mode="r")


def scan_token_range(tokens: np.ndarray, vocab_size: int, name: str) -> None:
    """Checks the first SCAN_TOKENS tokens against the vocabulary, a chunk at a time."""
    limit = min(len(tokens), SCAN_TOKENS)
    for start in range(0, limit, SCAN_CHUNK):
        stop = min(start + SCAN_CHUNK, limit)
        check_token_range(np.asarray(tokens[start:stop]), vocab_size, name, start)


def read_token_corpus(path: str, key: str, token_dtype: str, vocab_size: int) -> TokenStream:
    """Opens every `.bin`/`.npy` file of `path` (config key `key`) as one token stream."""
    if not path:
        raise DataError(f"{key} is empty: set it to a .bin/.npy token file or a directory")
    parts = []
    for file in list_files(path, key, TOKEN_SUFFIXES):
        tokens = open_token_file(str(file), token_dtype)
        scan_token_range(tokens, vocab_size, str(file))
        parts.append(TokenPart(str(file), tokens))
    return TokenStream(parts, vocab_limit=vocab_size)
