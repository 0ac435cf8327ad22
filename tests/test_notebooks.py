"""Run every notebook in notebooks/ top to bottom and fail on any error.

Each notebook runs in a fresh `python3` kernel with notebooks/ as its working directory, as a reader
would run it; a failing cell (an exception, or an `assert` comparing with the reference library)
fails the test. New notebooks are picked up by the glob below.

A notebook that needs reference material from beside the repository says so in its metadata,
paths relative to the repository root:

    "metadata": {"pegasus": {"requires": ["../shared/pegasus/spiece.model"]}}

and the test skips, naming the missing file, when one is absent. PEGASUS_CHECKPOINT, if set, is
passed on to the kernel, so `PEGASUS_CHECKPOINT=/path/to/google-pegasus-xsum python -m pytest
tests/test_notebooks.py` runs the notebooks on a real checkpoint.

Notebooks are committed executed, with their outputs and plots. After editing one, store it again:

    python tests/test_notebooks.py notebooks/02_architecture.ipynb    # no argument: all notebooks
"""

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Seconds per cell. Most notebooks take well under a minute in all; 05_training's experiment cell (GSG pretraining
# and fine-tuning, 3 seeds in 3 worker processes) needs about 8 minutes of CPU: about 4 minutes on two free cores,
# about 8.5 on one. An earlier version, at 3.5 minutes of CPU, took 9 minutes on a machine shared with several other
# jobs (load ~7), so the limit leaves room for a busy machine, or a single core.
CELL_TIMEOUT = 1800


def missing_requirements(nb) -> list[Path]:
    requires = nb.metadata.get("pegasus", {}).get("requires", [])
    return [(ROOT / r).resolve() for r in requires if not (ROOT / r).exists()]


def execute(nb):
    """Run `nb` in place, as from notebooks/. Raises nbclient's CellExecutionError on a failing cell."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    return nb


def files_in(directory: Path) -> set[Path]:
    skip = {"__pycache__", ".ipynb_checkpoints"}
    return {p for p in directory.rglob("*") if not skip & set(p.relative_to(directory).parts)}


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_executed(path):
    """Committed notebooks carry their outputs: every code cell ran, in order, in one session, without
    an error. (An unexecuted or half-executed notebook cannot slip in unnoticed.)"""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not stored executed top to bottom (execution counts {counts}); "
        f"run `python tests/test_notebooks.py {path.relative_to(ROOT)}`")
    errors = [o.get("ename") for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} is stored with errors: {errors}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_opens_with_goals_and_ends_with_next_steps(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and "you will learn" in first.source.lower(), (
        f"{path.name} should open with a markdown cell saying what you will learn")
    assert last.cell_type == "markdown" and "read next" in last.source.lower(), (
        f"{path.name} should end with a markdown cell saying what to read next")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    missing = missing_requirements(nb)
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(map(str, missing))} (reference material beside the repo)")
    before = files_in(NOTEBOOK_DIR)
    execute(nb)
    created = sorted(str(p.relative_to(ROOT)) for p in files_in(NOTEBOOK_DIR) - before)
    assert not created, f"{path.name} wrote files into the repository: {created}; use a temporary directory"


if __name__ == "__main__":  # re-execute notebooks and store them with their outputs
    import os

    import nbformat

    if os.environ.get("PEGASUS_CHECKPOINT"):
        print("note: PEGASUS_CHECKPOINT is set, so the stored outputs will come from that checkpoint")
    for arg in sys.argv[1:] or NOTEBOOKS:
        path = Path(arg).resolve()
        nb = nbformat.read(path, as_version=4)
        if missing_requirements(nb):
            sys.exit(f"{path.name} needs {', '.join(map(str, missing_requirements(nb)))}")
        start = time.perf_counter()
        execute(nb)
        nbformat.write(nb, path)
        print(f"{path.relative_to(ROOT)}: executed and stored in {time.perf_counter() - start:.1f} s")
