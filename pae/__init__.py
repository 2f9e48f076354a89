"""pae: principled approximations for efficient deep learning, as composable JAX transforms.

Subpackages are imported on first use (``pae.data``, ``pae.models``, ``pae.train``, ``pae.optim`` ...),
so ``import pae`` stays cheap and a subpackage's heavy dependencies load only when asked for.
The subpackages offered are the ones installed (found on ``pae.__path__``), so ``dir(pae)`` lists
exactly what can be imported. ``docs/design.md`` says what each family covers so far.
"""
import importlib as _importlib
import pkgutil as _pkgutil

__version__ = "0.1.0"

#: the subpackages that exist, found on disk (a new one appears here when its folder is added)
_SUBPACKAGES = tuple(sorted(
    info.name for info in _pkgutil.iter_modules(__path__) if info.ispkg and not info.name.startswith("_")))

#: the transform protocol, re-exported from ``pae.core`` on first use
_CORE_NAMES = ("Context", "Transform", "chain", "identity", "select")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"{__name__}.{name}")
    if name in _CORE_NAMES:
        return getattr(_importlib.import_module(f"{__name__}.core"), name)
    raise AttributeError(f"module 'pae' has no attribute {name!r}")


def __dir__():
    public = [name for name in globals() if not name.startswith("_") or name.startswith("__")]
    return sorted(public + list(_SUBPACKAGES) + list(_CORE_NAMES))
