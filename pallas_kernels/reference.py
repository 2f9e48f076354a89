"""``reference_packed_matmul``: the same math as the kernels in plain ``jnp`` (oracle and CPU path)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import _prep
from pallas_kernels._dequant import center
from pallas_kernels.format import PackedWeight, segment_codes


def _segment_weight(seg, packed: PackedWeight, mode: str, w_dtype) -> jax.Array:
    """The (K_s, N) weight operand of one segment, exactly as the kernels feed it to the MMA.

    float, per-channel: (q - c).astype(x.dtype), c = floor(o): exact integers; the remainder
           (o - c) * rowsum(x) is subtracted after the dot (``_prep.float_corrections``)
    float, grouped:     ((q - o) * s_group).astype(x.dtype)
    int:                (q - 2**(b-1)).astype(int8)
    """
    q = segment_codes(seg, packed.k_tile)[: seg.k, : packed.n]
    if mode == "int":
        return (q - _prep.int_center(seg.bits)).astype(jnp.int8)
    if packed.group_size is None:
        return (q - center(seg.offset)).astype(w_dtype)
    w = q.astype(jnp.float32) - seg.offset
    s = jnp.repeat(seg.scales[:, : packed.n], packed.group_size, axis=0)[: seg.k]
    return (w * s).astype(w_dtype)


def reference_packed_matmul(x: Any, packed: PackedWeight, *, x_scale: Any = None,
                            out_dtype: Any = None) -> jax.Array:
    """y = x @ dequantize(packed), computed segment by segment like the kernels.

    float x (bf16/f16/f32):  y = sum_s (x_s @ (q_s - c_s) - (o_s - c_s) * rowsum(x_s)) * s_s   (f32 accumulation;
                             grouped: y = sum_s x_s @ ((q_s - o_s) * s_s[g]))
    int8 x:                  y = x_scale * sum_s s_s * (x_s @ c_s - (o_s - 2**(b_s-1)) * rowsum(x_s))
    """
    call = _prep.check_call(x, packed, x_scale, out_dtype)
    x = jnp.asarray(x)
    w_dtype, acc_dtype = _prep.kernel_dtypes(call.mode, x.dtype)
    x_segs = _prep.split_segments(x, packed)
    corr = (_prep.row_corrections(x_segs, packed) if call.mode == "int"
            else _prep.float_corrections(x_segs, packed))
    y = jnp.zeros((call.m, packed.n), jnp.float32)
    for xs, seg, c in zip(x_segs, packed.segments, corr):
        w = _segment_weight(seg, packed, call.mode, w_dtype)
        acc = jnp.dot(xs, w, preferred_element_type=acc_dtype,
                      precision=_prep.dot_precision(x.dtype)).astype(jnp.float32)
        if c is not None:
            acc = acc - c
        if packed.group_size is None:
            acc = acc * seg.scales[0, : packed.n]
        y = y + acc
    if call.mode == "int":
        y = y * jnp.reshape(x_scale, (call.m, 1)).astype(jnp.float32)
    return y.astype(call.out_dtype)
