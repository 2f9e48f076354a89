"""Test-session setup: eight forced CPU devices, so multi-device code paths run on this CPU machine,
and XLA's backend optimization level 1 (of 0-3; the default is higher): tests run many small
programs a few steps each, so compilation dominates the suite, and at level 1 XLA compiles
faster while steps run about as fast: the whole suite ran 1595 s instead of
1815 s on 2 cores (with ``init_variables`` jitted; ``pytest --durations=0``). Level 0 compiles
faster still but runs steps ~10x slower. Numerics are unchanged within float32 rounding.

XLA reads the flags once, when the backend starts, so they must be set before anything imports jax.
"""
import importlib.util
import os
import pathlib
import sys

for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=1"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the XLA flags)

_EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _directory_bytes(directory) -> dict:
    """``{relative path: bytes}`` of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture
def directory_bytes():
    """A function ``directory -> {relative path: bytes}``: compare a run directory before and after."""
    return _directory_bytes


@pytest.fixture(scope="session")
def load_script():
    """A function ``load(name, module_name=None)``: a fresh module run from ``experiments/<name>.py``.
    With ``module_name`` the module is registered in ``sys.modules`` under that name before it runs
    (dataclasses and pickle look their module up there), and unregistered when the session ends."""
    registered = []

    def load(name: str, module_name: str | None = None):
        spec = importlib.util.spec_from_file_location(module_name or name, _EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        if module_name is not None:
            sys.modules[module_name] = module
            registered.append(module)
        spec.loader.exec_module(module)
        return module

    yield load
    for module in registered:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]


def pytest_collection_finish(session):
    """Start the notebooks in the background (tests/test_notebooks.py) when any of their tests was
    collected: the kernels run alongside the rest of the suite."""
    for item in session.items:
        if item.module.__name__.endswith("test_notebooks") and item.name.startswith("test_notebook_executes"):
            item.module.start_in_background()
            return
