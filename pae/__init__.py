"""pae: principled approximations for efficient deep learning, as composable JAX transforms.

Subpackages are imported on first use (``pae.data``, ``pae.models``, ``pae.train``, ``pae.optim`` ...),
so ``import pae`` stays cheap and a subpackage's heavy dependencies load only when asked for.
"""
import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("core", "data", "models", "train", "optim", "sparsity", "quant", "sharing", "growth")


#: the transform protocol, re-exported from ``pae.core`` on first use
_CORE_NAMES = ("Context", "Transform", "chain", "identity", "select")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _CORE_NAMES:
        return getattr(importlib.import_module(f"{__name__}.core"), name)
    raise AttributeError(f"module 'pae' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBPACKAGES) + list(_CORE_NAMES))
