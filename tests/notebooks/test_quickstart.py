"""Executes notebooks/quickstart.ipynb end to end with tiny settings, so it cannot rot.

The cell tagged "parameters" is followed by an injected cell that overrides its values
(papermill's convention), and the notebook runs in a fresh kernel with nbclient. The kernel
spec "python3" starts `python -m ipykernel_launcher`, and jupyter_client replaces a bare
"python" by `sys.executable`, so the kernel is this test's interpreter (the .venv).
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
TINY = (
    'STEPS = 4\nEVAL_EVERY = 2\nTITANS_STEPS = 2\nTEXT_STEPS = 2\nKIND = "attention"\n'
    "CORPUS_DOCS = 40\nBPE_VOCAB = 400\nTOKEN_STEPS = 2\n"
)


def _with_tiny_parameters(notebook):
    tagged = [
        index
        for index, cell in enumerate(notebook.cells)
        if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(TINY))
    return notebook


def test_notebook_is_committed_without_large_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    outputs = sum(
        len(cell.get("outputs", [])) for cell in notebook.cells if cell.cell_type == "code"
    )
    assert outputs == 0, "clear the outputs before committing (Kernel > Restart & Clear Output)"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_quickstart_runs_end_to_end(tmp_path):
    notebook = _with_tiny_parameters(nbformat.read(NOTEBOOK, as_version=4))
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,  # per cell; the whole run takes about a minute on 2 CPU cores
        resources={"metadata": {"path": str(tmp_path)}},  # any files land in tmp_path
    )
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "parameters" in text  # the model summary printed its parameter count
    assert "query key" in text  # generation ran
    assert "vocab_size 400, eos id 0, uint16" in text  # the corpus was tokenized
    assert "Return the" in text  # ... and a model trained on it sampled from the tokenizer
    assert "layer_00 lmm" in text  # the Titans memory was traced
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2  # the MQAR curves and the memory trace
