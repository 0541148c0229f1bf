"""Byte-level text: the bytes of local files are the tokens (vocabulary 256).

Documents are joined with one separator byte (0, which plain text does not contain) so a
model can tell where one file ends and the next begins. The joined corpus is held in memory
as one uint8 array; `data.max_bytes` caps how much of it is read.
"""

import glob
import os
import sysconfig

import numpy as np

from data.files import list_files
from data.windows import TokenPart, TokenStream
from errors import DataError

DOCUMENT_SEPARATOR = b"\x00"


def default_corpus_files() -> list[str]:
    """The running interpreter's standard library `*.py` files (top level only), sorted.

    Always present, a few MiB of real text, so a run works with no data downloaded; it
    differs between Python versions, so it is a smoke-test corpus, not a benchmark.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(stdlib, "*.py")))


def read_corpus(path: str, key: str, max_bytes: int) -> TokenStream:
    """Reads the files of `path` ("" = the standard library) into one byte stream.

    Files are read in sorted order until `max_bytes` (0 = no cap) is reached; the last one
    may be cut short. Empty files are skipped; a corpus with no bytes is a DataError.
    """
    if path:
        files = [str(file) for file in list_files(path, key)]
        label = path
    else:
        files = default_corpus_files()
        label = f"the standard library ({sysconfig.get_paths()['stdlib']})"
        if not files:
            raise DataError(f"{label}: no *.py files for the default data.path")
    chunks = []
    size = 0
    for file in files:
        if max_bytes and size >= max_bytes:
            break
        budget = max_bytes - size if max_bytes else -1  # -1: read the whole file
        with open(file, "rb") as handle:
            content = handle.read(budget)
        if not content:
            continue
        if chunks:
            chunks.append(DOCUMENT_SEPARATOR)
            size += len(DOCUMENT_SEPARATOR)
        chunks.append(content)
        size += len(content)
    if size == 0:
        raise DataError(f"{label}: {key} holds no text (all files are empty)")
    corpus = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    if max_bytes:
        corpus = corpus[:max_bytes]
    # Bytes are always < 256, so no per-window vocabulary check is needed.
    return TokenStream([TokenPart(label, corpus)])
