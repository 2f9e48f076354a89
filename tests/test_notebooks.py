"""Every notebook in notebooks/ executes top to bottom (their cells carry their own assertions).

Each notebook runs through ``jupyter execute`` in its own process (with its own kernel process and one
CPU device, as a reader's machine has: the eight virtual devices this test session forces are removed
from its ``XLA_FLAGS``), in a scratch directory, so nothing it does, the ZeroMQ traffic to its kernel
included, shares this test process. They are started in the background when the session's
collection is done (``conftest.py``), one notebook at a time, so they run alongside the other tests,
which compile on one core much of the time; the tests here wait for them.
"""
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 900   # per cell
_RESULTS: concurrent.futures.Future = concurrent.futures.Future()


def _kernel_env() -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _execute(path: pathlib.Path, env: dict):
    """The executed notebook, or a RuntimeError carrying the end of what ``jupyter execute`` printed."""
    with tempfile.TemporaryDirectory() as workdir:
        shutil.copy(path, workdir)
        done = subprocess.run(
            [sys.executable, "-m", "jupyter", "execute", f"--timeout={TIMEOUT_S}", "--kernel_name=python3",
             "--output=executed", path.name], cwd=workdir, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return RuntimeError(f"jupyter execute {path.name} exited {done.returncode}:\n{done.stderr[-6000:]}")
        return nbformat.read(os.path.join(workdir, "executed.ipynb"), as_version=4)


def _run_all(env: dict):
    try:
        _RESULTS.set_result({p: _execute(p, env) for p in NOTEBOOKS})
    except BaseException as error:  # noqa: BLE001  (handed to the tests)
        _RESULTS.set_exception(error)


def start_in_background():
    """Start executing every notebook in a daemon thread (once), in the environment of now (tests
    that change variables later do not reach the kernels)."""
    if not (_RESULTS.running() or _RESULTS.done()):
        _RESULTS.set_running_or_notify_cancel()
        threading.Thread(target=_run_all, args=(_kernel_env(),), name="notebooks", daemon=True).start()


@pytest.fixture(scope="module")
def executed() -> dict:
    start_in_background()   # no-op when conftest started it already
    return _RESULTS.result()


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
