"""examples/notebook/ioi_toy.ipynb executes on CPU (nbclient, a fresh kernel) without an
error, and its outputs show what examples/notebook/README.md says they show: the sweep's
grid, the check's verdict and short repr, the per-prompt table, and two inline figures."""
from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook" / "ioi_toy.ipynb"

for needed in ("nbclient", "nbformat", "ipykernel", "matplotlib", "pandas"):
    pytest.importorskip(needed, reason=f"the example notebook needs {needed} "
                        "(pip install 'circuitlang[notebook]' nbclient ipykernel)")


def _text(output) -> str:
    if output.output_type == "stream":
        return output.text
    data = output.get("data", {})
    return "\n".join(str(data.get(kind, "")) for kind in ("text/plain", "text/html", "image/svg+xml"))


@pytest.fixture(scope="module")
def executed():
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: tiny models, a shared CPU
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        mp.undo()
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.slow
def test_the_notebook_runs_without_errors(executed):
    errors = [o for cell in executed for o in cell.outputs if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    assert all(cell.execution_count is not None for cell in executed)


@pytest.mark.slow
def test_its_outputs_show_the_sweep_the_check_and_the_figures(executed):
    outputs = {i: "\n".join(_text(o) for o in cell.outputs) for i, cell in enumerate(executed)}
    every = "\n".join(outputs.values())
    # the sweep: its repr, its layer x head table, the denoised grid as a DataFrame
    assert "ExperimentResult(patch 'patch head * at END': 3x4 sites x 16 prompts, noise" in every
    assert "<td>L1</td>" in every and "denoise" in every
    # the check: its short repr and its HTML verdict
    check = next(text for text in outputs.values() if "CheckResult(toy-ioi, ioi, logit_diff, n=16" in text)
    assert "1 of 1 expectations hold" in check and "<b>every expectation holds</b>" in check
    assert "recovered" in check and "95% CI" in check
    # the per-prompt table and the two figures (the heatmap, the circuit diagram)
    assert "scrubbed" in every and "random" in every
    figures = [o for cell in executed for o in cell.outputs if "image/svg+xml" in o.get("data", {})]
    assert len(figures) == 2 and all("<svg" in o["data"]["image/svg+xml"] for o in figures)
