"""Documents of a local corpus, as strings: text files, JSON Lines and Parquet.

`data.prepare` reads its input through `read_documents`. What counts as one document:
- a text file (any name not ending in .jsonl / .parquet): the whole file, UTF-8;
- a JSON Lines file (`.jsonl`): each line's `text_field` (default "text");
- a Parquet file (`.parquet`): each row's `text_field` column, read a row group at a time.
A directory is walked as `data.files.list_files` walks it (recursive, sorted, hidden entries
skipped). Empty documents are skipped. Bad input raises DataError naming the file (and
line), never a traceback.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

from data.files import list_files
from errors import DataError

JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)


def input_files(path: str, key: str = "--input") -> list[Path]:
    """The files of `path` in reading order (DataError if there are none)."""
    return list_files(path, key)


def _text_file(file: Path) -> Iterator[str]:
    data = file.read_bytes()
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{file}: not UTF-8 text (byte {error.start}); give text, .jsonl or .parquet files"
        ) from None


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{where}: no {text_field!r} field (set --text_field)")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
    return value


def _jsonl_file(file: Path, text_field: str) -> Iterator[str]:
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{file}:{number}: not a JSON object ({error.msg})") from None
            yield _field(record, text_field, f"{file}:{number}")


def _parquet_file(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(file)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several kinds
        raise DataError(f"{file}: not a readable Parquet file ({error})") from None
    if text_field not in table.schema_arrow.names:
        raise DataError(
            f"{file}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}; "
            "set --text_field)"
        )
    for batch in table.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{file}: column {text_field!r} holds {type(value).__name__}")
            yield value or ""


def file_documents(file: Path, text_field: str) -> Iterator[str]:
    """The documents of one file, by its kind (see the module docstring)."""
    if file.name.endswith(JSONL_SUFFIXES):
        return _jsonl_file(file, text_field)
    if file.name.endswith(PARQUET_SUFFIXES):
        return _parquet_file(file, text_field)
    return _text_file(file)


def read_documents(files: list[Path], text_field: str) -> Iterator[str]:
    """Every non-empty document of `files`, in order."""
    for file in files:
        for document in file_documents(file, text_field):
            if document:
                yield document


def expected_bytes(files: list[Path]) -> int | None:
    """About how many bytes of text `files` hold (their sizes), or None when a Parquet
    file's compressed size says nothing about it: the total of a progress bar."""
    if any(file.name.endswith(PARQUET_SUFFIXES) for file in files):
        return None
    return sum(os.path.getsize(file) for file in files)
