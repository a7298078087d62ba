"""The notebooks run top to bottom (small settings), and are committed without outputs."""

import pathlib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
  names = [p.name for p in NOTEBOOKS]
  assert "01_quickstart.ipynb" in names and "02_inside_hope.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs, f"{path.name} cell {i} has outputs: strip them before committing"
      assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, jax_cache):
  from nbclient import NotebookClient

  # The kernel inherits this environment: smoke sizes, no display.
  monkeypatch.setenv("HOPE_NB_SMOKE", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # The notebooks train four times with the same smoke config: a persistent compilation
  # cache, shared by both, lets all runs after the first skip XLA compilation.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(jax_cache))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  # As Jupyter runs it: the kernel starts in notebooks/ and only the installed package is
  # importable, so the notebook must find the repository's experiments/ itself.
  monkeypatch.delenv("PYTHONPATH", raising=False)
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, kernel_name="python3", timeout=240,
                          resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # Raises CellExecutionError (with the cell and traceback) on any failure.
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
