"""An English corpus every machine with Python has: the standard library's documentation.

    python -m data.stdlib_docs --output=corpus/stdlib_docs.jsonl

writes JSON Lines, one document per record ({"text": ..., "source": ...}): the docstrings
of each standard-library module (module, classes, functions, in source order; tests and
IDLE left out), and each topic of `pydoc_data.topics` (the language reference's prose that
`help()` shows). About 2.4 MB of English technical prose on CPython 3.11, from ~600
modules and ~90 topics: a real corpus for `python -m data.prepare` with no download. Like
the byte-level default corpus it differs between Python versions, so it is a corpus to
try the tokens path on, not a benchmark.
"""

import ast
import glob
import json
import os
import sys
import sysconfig
import tempfile

from errors import ArgumentParser, DataError, run_cli

SKIPPED_PARTS = ("test", "tests", "idlelib", "site-packages", "__pycache__")
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def module_docstrings(file: str) -> str:
    """A module's docstrings (its own, its classes' and functions'), blank-line separated."""
    try:
        with open(file, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""  # a file the running interpreter cannot parse (e.g. lib2to3 fixtures)
    nodes = [node for node in ast.walk(tree) if isinstance(node, DOCUMENTED)]
    nodes.sort(key=lambda node: getattr(node, "lineno", 0))  # source order, module first
    docstrings = (ast.get_docstring(node) for node in nodes)
    return "\n\n".join(text for text in docstrings if text)


def documents():
    """(source, text) of every module with docstrings, then of every pydoc topic."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True))
    for file in files:
        relative = os.path.relpath(file, stdlib)
        if any(part in SKIPPED_PARTS for part in relative.split(os.sep)):
            continue
        text = module_docstrings(file)
        if text:
            yield relative, text
    from pydoc_data import topics

    for name in sorted(topics.topics):
        yield f"pydoc_data.topics:{name}", topics.topics[name].strip()


def write(output: str) -> int:
    """Writes the corpus to `output` (replaced atomically) and returns its size in bytes."""
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", dir=directory, suffix=".partial", delete=False)
    try:
        with handle:
            for source, text in documents():
                handle.write(json.dumps({"text": text, "source": source}) + "\n")
        size = os.path.getsize(handle.name)
        if size == 0:
            raise DataError(f"{output}: the standard library gave no docstrings")
        os.replace(handle.name, output)
    except BaseException:
        os.unlink(handle.name)
        raise
    return size


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m data.stdlib_docs", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="the .jsonl file to write")
    args = parser.parse_args(argv)
    if os.path.isdir(args.output):
        raise DataError(f"{args.output}: --output is a directory, give a .jsonl file name")
    size = write(args.output)
    print(f"{args.output}: {size / 1e6:.1f} MB of the standard library's documentation")


if __name__ == "__main__":
    sys.exit(run_cli(main))
