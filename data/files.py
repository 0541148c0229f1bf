"""Finding the files a data path names: one file, or a directory walked in a fixed order."""

import os
from pathlib import Path

from errors import DataError


def list_files(path: str, key: str, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """The files under `path` (config key `key`), sorted, so every process sees one order.

    A directory is walked recursively; hidden files and directories (".git", ".DS_Store")
    are skipped. With `suffixes`, only files ending in one of them count.
    """
    root = Path(os.path.expanduser(path))
    wanted = f" ({', '.join(suffixes)})" if suffixes else ""
    if not root.exists():
        raise DataError(f"{path}: {key} does not exist")
    if root.is_file():
        if suffixes and not root.name.endswith(suffixes):
            raise DataError(f"{path}: {key} is not a file of a supported kind{wanted}")
        return [root]
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for name in names:
            if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                continue
            candidate = Path(directory) / name
            if candidate.is_file():
                files.append(candidate)
    if not files:
        raise DataError(f"{path}: {key} is a directory with no data files{wanted}")
    # Sort by the path relative to the root so the order does not depend on where it lives.
    return sorted(files, key=lambda file: file.relative_to(root).as_posix())
