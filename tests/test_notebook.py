"""examples/quickstart.ipynb: stored without outputs, and it runs top to bottom (on a tiny model) in a kernel
left as a user's is (no MPLBACKEND set), with every figure it draws shown as an image."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tiny import save_tiny

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_outputs_are_stripped():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_quickstart_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pd.DataFrame([dict(es=f"la casa {i} es grande", nah=f"in calli {i} huei") for i in range(60)]).to_csv(
        tmp_path / "pairs.csv", index=False)
    for key, value in dict(MODEL=str(save_tiny(tmp_path / "tiny")), CORPUS=str(tmp_path / "pairs.csv"),
                           STEPS="2", KS="0,1,6", PAIRS="3", OUT=str(tmp_path / "runs")).items():
        monkeypatch.setenv(f"QUICKSTART_{key}", value)
    monkeypatch.delenv("MPLBACKEND", raising=False)   # the kernel's own (inline) backend, as in Jupyter
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert '"layers_to_transform"' in text and "unfrozen_parameters" in text
    # a figure cell: its result is a Figure (its text form "<Figure size ...>"); each must carry an image
    figures = [c for c in code if any("Figure size" in o.get("data", {}).get("text/plain", "") for o in c.outputs)]
    assert any("specialization_heatmaps" in c.source for c in figures), "the heatmap cell returned no figure"
    for cell in figures:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"no image/png output: {cell.source}"
    # with ipywidgets (the notebook extra) tqdm draws one widget bar, not a text line per update
    stderr = "".join(o.get("text", "") for c in code for o in c.outputs if o.get("name") == "stderr")
    assert "IProgress not found" not in stderr
    assert (tmp_path / "runs" / "probe" / "sweeps.parquet").is_file()
    assert (tmp_path / "runs" / "probe" / "selection.json").is_file()
