"""``packed_matmul``: one entry point that picks the kernel for the platform.

    backend="auto":  TPU -> Mosaic TPU kernel ("tpu");  NVIDIA GPU -> Pallas Triton kernel ("triton");
                     CPU -> ``reference_packed_matmul``, or with ``interpret=True`` the TPU kernel
                     run by the Pallas interpreter.
    backend="tpu" | "triton" | "mosaic_gpu" | "reference" forces one path ("mosaic_gpu": the Hopper
    wgmma kernel, opt-in, see ``gpu_mosaic``).
"""
from __future__ import annotations

from typing import Any

import jax

from pallas_kernels import _prep
from pallas_kernels.format import PackedWeight
from pallas_kernels.reference import reference_packed_matmul

BACKENDS = ("auto", "reference", "tpu", "triton", "mosaic_gpu")
_KERNELS = ("tpu", "triton", "mosaic_gpu")
_NATIVE = {"tpu": "tpu", "triton": "gpu", "mosaic_gpu": "gpu"}


def _platform() -> str:
    """'tpu', 'gpu' (NVIDIA/CUDA), 'rocm' or 'cpu' for the default device."""
    d = jax.devices()[0]
    if d.platform == "gpu":
        client = getattr(d, "client", None)
        version = str(getattr(client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version or "hip" in version else "gpu"
    return d.platform


def _check_int8_mma() -> None:
    """The int8 path needs integer tensor cores (compute capability >= 8.0)."""
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major = int(str(cc).split(".")[0])
    except ValueError:
        return  # unknown: let the compiler decide
    if major < 8:
        raise ValueError(f"the int8 activation path needs int8 tensor cores (compute capability >= 8.0); "
                         f"this GPU has {cc}: use float activations")


def resolve_backend(backend: str = "auto", interpret: bool = False, platform: str | None = None) -> str:
    """The concrete path ``packed_matmul`` will take (see module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be a bool, got {type(interpret).__name__}")
    plat = platform or _platform()
    if backend == "auto":
        if plat == "tpu":
            return "tpu"
        if plat == "gpu":
            return "triton"
        return "tpu" if interpret else "reference"
    if backend in _KERNELS and not interpret and plat != _NATIVE[backend]:
        raise ValueError(f"backend={backend!r} needs a {_NATIVE[backend].upper()} device but the default "
                         f"device is {plat!r}: pass interpret=True to run the kernel in the Pallas "
                         f"interpreter, or backend='reference'")
    return backend


def packed_matmul(x: Any, packed: PackedWeight, *, x_scale: Any = None, out_dtype: Any = None,
                  backend: str = "auto", interpret: bool = False, blocks: Any = None,
                  _platform: str | None = None) -> Any:
    """y = x @ W for a packed low-bit W (weight-only, or int8 activations with ``x_scale``).

    x: (M, K) bfloat16 / float16 / float32, or int8 with x_scale (M,) (``quantize_activations``);
    packed: a ``PackedWeight``; returns (M, N) in ``out_dtype`` (default x.dtype; float32 for int8).
    y = sum_s (x[:, perm]_s @ ((q_s - o_s) * s_s))   — see ``reference_packed_matmul`` for the exact math.
    ``blocks`` overrides the kernel's block sizes (``TpuBlocks`` / ``TritonBlocks`` / ``MosaicBlocks``).
    (``_platform`` is for ``lowering.export_kernel``: lower for a platform this machine lacks.)
    """
    _prep.check_call(x, packed, x_scale, out_dtype)
    path = resolve_backend(backend, interpret, _platform)
    if path == "reference":
        return reference_packed_matmul(x, packed, x_scale=x_scale, out_dtype=out_dtype)
    if path == "tpu":
        from pallas_kernels.tpu import tpu_packed_matmul
        return tpu_packed_matmul(x, packed, x_scale=x_scale, out_dtype=out_dtype, blocks=blocks,
                                 interpret=interpret)
    if path == "triton":
        if not interpret and jax.numpy.dtype(x.dtype) == jax.numpy.int8:
            _check_int8_mma()
        from pallas_kernels.gpu_triton import triton_packed_matmul
        return triton_packed_matmul(x, packed, x_scale=x_scale, out_dtype=out_dtype, blocks=blocks,
                                    interpret=interpret)
    from pallas_kernels.gpu_mosaic import mosaic_gpu_packed_matmul
    return mosaic_gpu_packed_matmul(x, packed, x_scale=x_scale, out_dtype=out_dtype, blocks=blocks,
                                    interpret=interpret)
