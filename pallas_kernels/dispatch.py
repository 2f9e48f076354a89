"""``packed_matmul``: one entry point that picks the kernel for the platform.

    backend="auto":  TPU -> Mosaic TPU kernel ("tpu");  NVIDIA GPU -> Pallas Triton kernel ("triton");
                     CPU -> ``reference_packed_matmul``, or with ``interpret=True`` the TPU kernel
                     run by the Pallas interpreter.
    backend="tpu" | "triton" | "mosaic_gpu" | "reference" forces one path ("mosaic_gpu": the Hopper
    wgmma kernel, opt-in, see ``gpu_mosaic``).

Large M on a GPU: weight-only quantization cannot beat bf16 once the GEMM is compute-bound, so at
M >= ``LARGE_M_CROSSOVER`` (float activations) the GPU kernels hand over to *dequantize once + XLA
bf16 GEMM* (``reference_packed_matmul``: one fused unpack of the weight, then cuBLAS).  The
threshold was measured on an H200 (jax 0.11.2; ``experiments/gpu_check.sh``, results in
``experiments/results/kernels_gpu_h200_*.json``): the Triton kernel was faster than dequantize + XLA
at M = 1 and 16 (K = N = 4096 and 8192, 2 and 4 bits), slower at every M from 64 to 4096; M from 17
to 63 was not measured and goes to XLA.  ``plan`` says which path a call takes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from pallas_kernels import _prep
from pallas_kernels.format import PackedWeight
from pallas_kernels.reference import reference_packed_matmul

BACKENDS = ("auto", "reference", "tpu", "triton", "mosaic_gpu")
_KERNELS = ("tpu", "triton", "mosaic_gpu")
_NATIVE = {"tpu": "tpu", "triton": "gpu", "mosaic_gpu": "gpu"}
LARGE_M_CROSSOVER = 17  # GPU, float x: M at or above which dequantize + XLA GEMM runs (H200, above)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``packed_matmul`` runs: ``path`` is a backend name or "xla_dequant" (large M on a GPU);
    ``blocks`` the kernel's block sizes (None for XLA paths)."""

    path: str
    blocks: Any = None

    def describe(self) -> str:
        return self.path if self.blocks is None else f"{self.path} {self.blocks}"


def plan(backend: str, m: int, packed: PackedWeight, x_dtype: Any = jax.numpy.bfloat16, *,
         interpret: bool = False, blocks: Any = None, platform: str | None = None,
         large_m: int | None = None) -> Plan:
    """The path and blocks for an (m, K) x (K, N) call (``backend`` as in ``packed_matmul``).

    GPU kernels with float x and ``m >= large_m`` (default ``LARGE_M_CROSSOVER``) -> "xla_dequant",
    unless ``blocks`` were given (an explicit kernel configuration is honoured)."""
    path = resolve_backend(backend, interpret, platform)
    threshold = LARGE_M_CROSSOVER if large_m is None else large_m
    is_float = jax.numpy.dtype(x_dtype) != jax.numpy.int8
    if path in ("triton", "mosaic_gpu") and is_float and blocks is None and m >= threshold:
        return Plan("xla_dequant")
    if path == "triton" and blocks is None:
        from pallas_kernels.gpu_triton import choose_blocks
        blocks = choose_blocks(m, packed, x_dtype)
    return Plan(path, blocks)


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
                  _platform: str | None = None, _large_m: int | None = None) -> Any:
    """y = x @ W for a packed low-bit W (weight-only, or int8 activations with ``x_scale``).

    x: (M, K) bfloat16 / float16 / float32, or int8 with x_scale (M,) (``quantize_activations``);
    packed: a ``PackedWeight``; returns (M, N) in ``out_dtype`` (default x.dtype; float32 for int8).
    y = sum_s (x[:, perm]_s @ ((q_s - o_s) * s_s))   — see ``reference_packed_matmul`` for the exact math.
    ``blocks`` overrides the kernel's block sizes (``TpuBlocks`` / ``TritonBlocks`` / ``MosaicBlocks``).
    On a GPU, float x with M >= ``LARGE_M_CROSSOVER`` runs dequantize + XLA GEMM (see ``plan``).
    (``_platform`` / ``_large_m`` are for ``lowering.export_kernel``: lower for a platform this machine
    lacks / move the large-M hand-over.)
    """
    call = _prep.check_call(x, packed, x_scale, out_dtype)
    p = plan(backend, call.m, packed, x.dtype, interpret=interpret, blocks=blocks, platform=_platform,
             large_m=_large_m)
    path, blocks = p.path, p.blocks
    if path in ("reference", "xla_dequant"):
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
