"""A host-side weight quantizer that produces ``pack`` inputs (absmax, midrise grid, NumPy).

Use it to pack float weights directly (benchmarks, examples, post-training quantization);
a trained quantizer such as pae's writes its own codes and scales through ``pack``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from pallas_kernels.format import check_bits, default_offset


class Quantized(NamedTuple):
    """codes (K, N) uint8, scales (N,) or (ceil(K/g), N) float32, offset: the ``pack`` arguments."""

    codes: np.ndarray
    scales: np.ndarray
    offset: float


def quantize_weight(w: Any, bits: int, group_size: int | None = None) -> Quantized:
    """Round a float (K, N) weight to ``bits``-bit codes on a symmetric midrise grid.

    o = (2**bits - 1) / 2;  s = max|w| / o over each output channel (or group of K rows);
    q = clip(round(w / s + o), 0, 2**bits - 1);  then |w - (q - o) * s| <= s / 2.
    All-zero channels/groups get s = 0, so they dequantize to exactly 0.
    """
    bits = check_bits(bits)
    w = np.asarray(w, np.float64)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"w must be a non-empty 2-D (K, N) array, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("w must be finite")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be None or a positive int")
    k, n = w.shape
    o = default_offset(bits)
    g = k if group_size is None else group_size
    n_groups = -(-k // g)
    wp = np.zeros((n_groups * g, n))
    wp[:k] = w
    amax = np.abs(wp.reshape(n_groups, g, n)).max(axis=1)          # (G, N)
    s = amax / o
    s_rows = np.repeat(np.where(s > 0, s, 1.0), g, axis=0)[:k]
    q = np.clip(np.round(w / s_rows + o), 0, 2 ** bits - 1).astype(np.uint8)
    scales = (s[0] if group_size is None else s).astype(np.float32)
    return Quantized(codes=q, scales=scales, offset=o)
