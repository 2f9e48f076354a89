"""Boundary checks and input preparation shared by the reference and every kernel.

Everything here runs at trace time on static shapes and dtypes, so bad input fails with a clear
error before any kernel is launched.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.format import PackedWeight, check_packed

FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


class Call(NamedTuple):
    """A validated call: ``mode`` is "float" (weight-only) or "int" (int8 activations)."""

    mode: str
    out_dtype: Any
    m: int


def check_call(x: Any, packed: Any, x_scale: Any, out_dtype: Any) -> Call:
    """Validate ``packed_matmul`` arguments; returns the mode and the output dtype."""
    packed = check_packed(packed, "packed")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be a jax or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}; reshape leading "
                         f"batch axes into M first")
    m, k = x.shape
    if k != packed.k:
        raise ValueError(f"x has K={k} columns but the packed weight has K={packed.k} rows "
                         f"(segments {[s.k for s in packed.segments]})")
    if m == 0:
        raise ValueError("x must have at least one row (M >= 1)")
    dt = jnp.dtype(x.dtype)
    if dt == jnp.int8:
        if x_scale is None:
            raise ValueError("x is int8 (integer path): pass x_scale, the per-row float scale of x "
                             "(see quantize_activations)")
        if not hasattr(x_scale, "shape") or tuple(x_scale.shape) not in ((m,), (m, 1)):
            raise ValueError(f"x_scale must have shape (M,)=({m},) or (M, 1), got "
                             f"{getattr(x_scale, 'shape', type(x_scale).__name__)}")
        if not jnp.issubdtype(x_scale.dtype, jnp.floating):
            raise TypeError(f"x_scale must be a float array, got {x_scale.dtype}")
        if packed.group_size is not None:
            raise ValueError("the int8 integer path needs per-output-channel scales; this packed "
                             f"weight has group_size={packed.group_size}: use float activations")
        mode = "int"
        out = jnp.float32 if out_dtype is None else out_dtype
    elif any(dt == jnp.dtype(f) for f in FLOAT_DTYPES):
        if x_scale is not None:
            raise ValueError("x_scale is only used with int8 x (the integer path); got float x "
                             f"({dt}) and an x_scale")
        mode = "float"
        out = dt if out_dtype is None else out_dtype
    else:
        raise TypeError(f"x dtype {dt} is not supported: use bfloat16, float16 or float32 "
                        f"(weight-only) or int8 with x_scale (integer path)")
    out = jnp.dtype(out)
    if not any(out == jnp.dtype(f) for f in FLOAT_DTYPES):
        raise TypeError(f"out_dtype={out} is not supported: use bfloat16, float16 or float32")
    return Call(mode=mode, out_dtype=out, m=m)


def split_segments(x: jax.Array, packed: PackedWeight) -> list[jax.Array]:
    """Permute the columns of x and cut them into the segments' K ranges (unpadded)."""
    if packed.input_perm is not None:
        x = jnp.take(x, packed.input_perm, axis=1)
    out, k0 = [], 0
    for seg in packed.segments:
        out.append(x[:, k0:k0 + seg.k])
        k0 += seg.k
    return out


def pad_to(a: jax.Array, rows: int, cols: int) -> jax.Array:
    """Zero-pad a 2-D array at the end to (rows, cols)."""
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def int_center(bits: int) -> int:
    """Integer path: codes are fed to the MMA as int8 ``c = q - 2**(bits-1)``."""
    return 2 ** (bits - 1)


def row_corrections(x_segs: list[jax.Array], packed: PackedWeight) -> list[jax.Array]:
    """Integer path: per segment, (M, 1) float32 ``(offset - 2**(bits-1)) * sum_k x_q[m, k]``.

    With c = q - 2**(b-1):  sum_k x[m,k] (q[k,n] - o) = (x @ c)[m,n] - (o - 2**(b-1)) * sum_k x[m,k].
    """
    out = []
    for xs, seg in zip(x_segs, packed.segments):
        d = seg.offset - int_center(seg.bits)
        rs = jnp.sum(xs.astype(jnp.int32), axis=1, keepdims=True).astype(jnp.float32)
        out.append(d * rs)
    return out


def float_corrections(x_segs: list[jax.Array], packed: PackedWeight) -> list[jax.Array | None]:
    """Float path with per-channel scales: per segment, (M, 1) float32 ``(o - c) * sum_k x[m, k]``
    with c = floor(o) (the MMA sees the exact integers q - c); None where o is an integer or the
    scales are grouped (grouped operands carry the offset themselves)."""
    from pallas_kernels._dequant import center

    out = []
    for xs, seg in zip(x_segs, packed.segments):
        d = seg.offset - center(seg.offset)
        if packed.group_size is not None or d == 0:
            out.append(None)
        else:
            out.append(d * jnp.sum(xs.astype(jnp.float32), axis=1, keepdims=True))
    return out


def quantize_activations(x: Any) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-row int8 quantization: ``x ~= x_q * x_scale[:, None]``.

    x_scale = max_k |x[m, k]| / 127 (1 for all-zero rows);  x_q = round(x / x_scale) in [-127, 127].
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a float array, got {x.dtype}")
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    xq = jnp.clip(jnp.round(xf / scale[:, None]), -127, 127).astype(jnp.int8)
    return xq, scale


def kernel_dtypes(mode: str, x_dtype: Any) -> tuple[Any, Any]:
    """(dtype of the weight operand fed to the MMA, accumulator dtype)."""
    if mode == "int":
        return jnp.int8, jnp.int32
    return jnp.dtype(x_dtype), jnp.float32


def dot_precision(x_dtype: Any):
    """float32 activations get a full-precision dot (no silent bf16/tf32 passes)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(x_dtype) == jnp.float32 else None


def sublane(dtype: Any) -> int:
    """Rows of one (8,128) 32-bit TPU tile for a dtype of this width (8 f32, 16 bf16, 32 int8)."""
    return 8 * 4 // np.dtype(dtype).itemsize

