"""Every notebook in notebooks/ executes top to bottom (their cells carry their own assertions).

The notebooks run two at a time (each in its own kernel process; a kernel compiles on one core much of
the time, so two share the machine's cores well), with one CPU device as a reader's machine has: the
eight virtual devices this test session forces are removed from the kernels' ``XLA_FLAGS``.
"""
import asyncio
import os
import pathlib
import tempfile

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
AT_ONCE = 2


def _kernel_env() -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


async def _execute(path: pathlib.Path, slots: asyncio.Semaphore):
    """The executed notebook, or the exception its execution raised."""
    async with slots:
        notebook = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory() as workdir:
            client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                                    resources={"metadata": {"path": workdir}})
            try:
                await client.async_execute(env=_kernel_env())
            except Exception as error:  # reported by the notebook's own test below
                return error
        return notebook


@pytest.fixture(scope="module")
def executed() -> dict:
    async def run_all():
        slots = asyncio.Semaphore(AT_ONCE)
        done = await asyncio.gather(*(_execute(p, slots) for p in NOTEBOOKS))
        return dict(zip(NOTEBOOKS, done))
    return asyncio.run(run_all())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, executed):
    notebook = executed[path]
    if isinstance(notebook, Exception):
        raise notebook
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "every notebook shows a figure"


def test_there_are_notebooks():
    assert NOTEBOOKS
