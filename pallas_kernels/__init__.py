"""pallas_kernels: packed low-bit GEMM (1/2/3/4/8-bit weights) with Pallas kernels for GPU and TPU.

Independent of pae.  Format: ``format`` (``pack``, ``pack_mixed``, ``unpack``, ``dequantize``,
``save``/``load``); oracle and CPU path: ``reference_packed_matmul``; kernels: ``tpu`` (Mosaic TPU),
``gpu_triton`` (Pallas Triton), ``gpu_mosaic`` (Pallas Mosaic GPU, Hopper, opt-in); dispatch:
``packed_matmul``.

    W[k, n] = (q[k, n] - offset) * scale[g(k), n]            y = x @ W
"""
from pallas_kernels._layout import FORMAT_VERSION, SUPPORTED_BITS, SUPPORTED_K_TILES, SUPPORTED_N_TILES
from pallas_kernels._prep import quantize_activations
from pallas_kernels.dispatch import BACKENDS, packed_matmul, resolve_backend
from pallas_kernels.format import (
    PackedSegment,
    PackedWeight,
    UnpackedSegment,
    default_offset,
    dequantize,
    from_state_dict,
    load,
    pack,
    pack_mixed,
    save,
    to_state_dict,
    unpack,
)
from pallas_kernels.quantize import Quantized, quantize_weight
from pallas_kernels.reference import reference_packed_matmul

__all__ = [
    "BACKENDS", "FORMAT_VERSION", "SUPPORTED_BITS", "SUPPORTED_K_TILES", "SUPPORTED_N_TILES",
    "PackedSegment", "PackedWeight", "UnpackedSegment", "default_offset", "dequantize",
    "from_state_dict", "load", "pack", "pack_mixed", "packed_matmul", "quantize_activations", "Quantized", "quantize_weight",
    "reference_packed_matmul", "resolve_backend", "save", "to_state_dict", "unpack",
]
