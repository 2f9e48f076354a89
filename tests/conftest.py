"""Test-session setup: eight forced CPU devices, so multi-device code paths run on this CPU machine.

XLA reads the flag once, when the backend starts, so it must be set before anything imports jax.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the XLA flags)


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
