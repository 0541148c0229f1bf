"""`python -m data.stdlib_docs`: the standard library's documentation as a JSONL corpus."""

import itertools
import json

import pytest

from data import stdlib_docs
from errors import DataError


def test_module_docstrings_in_source_order(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        '"""Module doc."""\n\nclass A:\n    """Class doc."""\n\n    def f(self):\n'
        '        """Method doc."""\n\n\ndef g():\n    pass\n\n\nasync def h():\n'
        '    """Coroutine doc."""\n'
    )
    assert stdlib_docs.module_docstrings(str(source)) == (
        "Module doc.\n\nClass doc.\n\nMethod doc.\n\nCoroutine doc."
    )
    (tmp_path / "bad.py").write_text("def (:\n")
    assert stdlib_docs.module_docstrings(str(tmp_path / "bad.py")) == ""


def test_writes_jsonl_records_and_refuses_a_directory(tmp_path, monkeypatch):
    first = list(itertools.islice(stdlib_docs.documents(), 3))
    assert all(text.strip() and source.endswith(".py") for source, text in first)
    monkeypatch.setattr(stdlib_docs, "documents", lambda: iter(first))
    stdlib_docs.main([f"--output={tmp_path / 'docs.jsonl'}"])
    records = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    assert [(r["source"], r["text"]) for r in records] == first
    with pytest.raises(DataError, match="--output is a directory"):
        stdlib_docs.main([f"--output={tmp_path}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no partial file
