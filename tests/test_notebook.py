"""notebooks/analyze_runs.ipynb runs top to bottom against a real tiny sweep, with no W&B server."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from helpers import REPO
from nbclient import NotebookClient

NOTEBOOK = REPO / "notebooks" / "analyze_runs.ipynb"


def inject_parameters(nb: nbformat.NotebookNode, **params: object) -> None:
    """Add a cell after the one tagged "parameters", as papermill does."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(
        index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    )


@pytest.mark.slow
def test_notebook_analyses_a_sweep(tiny_sweep: Path, tmp_path: Path) -> None:
    sweep_dir = tiny_sweep
    nb = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(nb, SWEEP_DIR=str(sweep_dir))
    # Runs in an empty folder: everything comes from SWEEP_DIR. Raises CellExecutionError on any error.
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    nbformat.write(nb, tmp_path / "executed.ipynb")  # kept for debugging a failure

    outputs = [
        out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    ]
    assert not [out for out in outputs if out.output_type == "error"]
    tables = [out.data["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert len(tables) == 1
    assert "val/mIoU" in tables[0] and "optimizer.lr" in tables[0] and "finished" in tables[0]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "2 runs, swept: ['optimizer.lr']" in text
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    # loss + mIoU curves, mIoU vs lr, per-class IoU, confusion matrix, predictions.
    assert len(figures) == 6
