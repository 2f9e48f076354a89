"""Version guards for the Pallas APIs this package uses (jax 0.10.x and 0.11.x).

* TPU compiler params: ``pltpu.CompilerParams`` (``TPUCompilerParams`` before the rename).
* GPU: Mosaic GPU is the default Pallas GPU backend since jax 0.9; Triton is chosen by passing
  ``pallas.triton.CompilerParams`` (deprecated in 0.11, still selectable).  If a future jax drops
  the module, ``triton_available()`` is False and the Triton path refuses with a clear error.
"""
from __future__ import annotations

import warnings
from typing import Any

import jax

try:
    from jax.experimental.pallas import tpu as _pltpu
except ImportError:  # pragma: no cover - every jax we support ships it
    _pltpu = None

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - future jax without the Triton backend
    _pltriton = None

try:
    from jax.experimental.pallas import mosaic_gpu as _plgpu
except ImportError:  # pragma: no cover
    _plgpu = None


def jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def tpu_compiler_params(dimension_semantics: tuple[str, ...], **kw: Any):
    cls = getattr(_pltpu, "CompilerParams", None) or getattr(_pltpu, "TPUCompilerParams")
    return cls(dimension_semantics=dimension_semantics, **kw)


def tpu_vmem(shape: tuple[int, ...], dtype: Any):
    mem = getattr(_pltpu, "VMEM", None)
    if mem is None:  # pragma: no cover - older spelling
        mem = _pltpu.TPUMemorySpace.VMEM
    return mem(shape, dtype)


def triton_available() -> bool:
    return _pltriton is not None and hasattr(_pltriton, "CompilerParams")


def triton_compiler_params(num_warps: int, num_stages: int):
    if not triton_available():
        raise RuntimeError(f"jax {jax.__version__} has no Pallas Triton backend; use "
                           f"backend='mosaic_gpu' or the reference")
    return _pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def mosaic_gpu_module():
    if _plgpu is None:  # pragma: no cover
        raise RuntimeError(f"jax {jax.__version__} has no Pallas Mosaic GPU backend")
    return _plgpu
