"""The deployed quantizer: uniform, symmetric, mid-rise, per-channel, 1..8 bits, straight-through.

For a bit width ``b`` (an integer in [1, 8]) and a clip range ``R >= 0`` (per output channel), the
grid has ``2**b`` levels, the offset is ``o = (2**b - 1) / 2`` and the step is

    delta(b, R) = 2 R / (2**b - 1) = R / o
    levels      = {(k - o) * delta : k = 0 .. 2**b - 1}            (mid-rise: no level at 0)
    codes       q = clip(round(clip(w, -R, R) / delta + o), 0, 2**b - 1)
    quantized   Q(w) = (q - o) * delta

So 1 bit gives ``{-R, +R} = {-delta/2, +delta/2}`` (never a grid whose only level is 0); 2 bits
``{-R, -R/3, R/3, R}``; 3 bits ``(k - 3.5) * 2R/7``; ... 8 bits ``(k - 127.5) * 2R/255``. Every level
lies in ``[-R, R]`` and ``|clip(w) - Q(w)| <= delta / 2``. This is exactly ``pallas_kernels``'s format
``W = (q - o) * s`` with the default midpoint offset and ``s = delta``, so export is lossless.

``R`` is the channel's max-abs by default (then the clip is a no-op); a learned clip ``R = exp(r)``
(:func:`quantize` with ``learned_range=True``) is the option. Gradients (straight-through, STE):

    max-abs range:  dQ/dw = 1 everywhere, R treated as a constant (stop-gradient)
    learned range:  Q = delta * (round_ste(clip(w, -R, R) / delta + o) - o), round_ste(x) = x + sg(round(x) - x):
                    dQ/dw = 1 inside [-R, R] and 0 outside; R gets the LSQ-style gradient through
                    delta and the clip (Esser et al. 2020, "Learned Step Size Quantization").

``bits`` may be a float array holding integers (the phase-2 palette stores them so) and broadcasts
against ``w`` (per input or output channel). Reference: SONIQ (arXiv 2311.14114), SMOL (NeurIPS 2022,
"Not All Bits have Equal Value"); the grid and the range are this library's reconstruction (the
papers' quantizer details were not retrievable), named ``"midrise-maxabs"``.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS, MAX_BITS = 1, 8


def check_bits(name: str, bits: Any, *, integer: bool = True, lo: float = MIN_BITS,
               hi: float = MAX_BITS) -> None:
    """ValueError unless concrete ``bits`` lie in ``[lo, hi]`` (and are integers when ``integer``).

    Tracers pass unchecked (check at the boundary, outside jit)."""
    if isinstance(bits, jax.core.Tracer):
        return
    try:
        values = np.asarray(bits, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or an array of numbers, got {bits!r}") from None
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite numbers of bits in [{lo}, {hi}], got {bits!r}")
    if values.min() < lo or values.max() > hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}] bits, got values in "
                         f"[{values.min():g}, {values.max():g}]")
    if integer and not np.all(values == np.round(values)):
        raise ValueError(f"{name} must be whole numbers of bits in [{lo}, {hi}], got {bits!r}")


def check_range(name: str, r: Any) -> None:
    """ValueError unless a concrete range ``r`` is finite and >= 0 (tracers pass unchecked)."""
    if r is None or isinstance(r, jax.core.Tracer):
        return
    try:
        values = np.asarray(r, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or an array of numbers, got {r!r}") from None
    if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0):
        raise ValueError(f"{name} (the clip range R) must be finite and >= 0, got values in "
                         f"[{np.nanmin(values):g}, {np.nanmax(values):g}]"
                         + (" and NaN" if np.isnan(values).any() else ""))


def offset(bits: Any) -> jax.Array:
    """``o = (2**b - 1) / 2``, the mid-rise offset (continuous ``b`` allowed)."""
    return (jnp.exp2(jnp.asarray(bits, jnp.float32)) - 1.0) / 2.0


def step_size(bits: Any, r: Any) -> jax.Array:
    """``delta(b, R) = 2 R / (2**b - 1)``: the deployed quantizer's step; continuous ``b`` allowed
    (the noise phase uses it at the channel's current learned width). Concrete ``bits`` outside
    ``[1, 8]`` or a negative ``r`` raise ValueError."""
    check_bits("bits", bits, integer=False)
    check_range("r", r)
    return jnp.asarray(r, jnp.float32) / offset(bits)


def max_abs_range(w: jax.Array, k_axes: int | None = None) -> jax.Array:
    """Per-output-channel range ``R[n] = max |w[..., n]|`` over the leading ``k_axes`` axes (default
    every axis but the last, shape ``(N,)``; a DenseGeneral kernel's ``R`` has its feature shape)."""
    w = jnp.asarray(w)
    k = w.ndim - 1 if k_axes is None else int(k_axes)
    return jnp.max(jnp.abs(w.astype(jnp.float32)), axis=tuple(range(k)))


def _round_ste(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def clip_ste(x: jax.Array, lo: Any, hi: Any) -> jax.Array:
    """``clip(x, lo, hi)`` whose derivative in ``x`` is 1 on the *closed* interval (``jnp.clip``
    gives 1/2 where ``x`` equals a bound, as the max-abs element does when the range starts at the
    max-abs) and 0 outside, where the bound gets it (the LSQ convention)."""
    return jnp.where(x > hi, hi, jnp.where(x < lo, lo, x))


def quantized_dtype(dtype) -> np.dtype:
    """The dtype ``Q(w)`` is returned in: ``w``'s, at least float32. The levels ``k * delta`` are
    exact in float32 but not in bfloat16 (a relative rounding of ~2e-3), and the exported model
    computes with the exact levels."""
    return jnp.promote_types(dtype, jnp.float32)


def codes(w: jax.Array, bits: Any, r: Any) -> jax.Array:
    """Integer codes ``q = clip(round(clip(w, -R, R) / delta + o), 0, 2**b - 1)`` as float32.

    ``delta = 0`` (an all-zero channel) gives ``q = round(o)`` and dequantizes to exactly 0.
    Concrete ``bits`` outside the whole numbers 1..8, or a negative or non-finite ``r``, raise
    ValueError."""
    check_bits("bits", bits)
    check_range("r", r)
    w = jnp.asarray(w, jnp.float32)
    bits = jnp.asarray(bits, jnp.float32)
    r = jnp.asarray(r, jnp.float32)
    o = offset(bits)
    delta = r / o
    safe = jnp.where(delta > 0, delta, 1.0)
    q = jnp.round(jnp.clip(w, -r, r) / safe + o)
    return jnp.clip(q, 0.0, 2.0 * o)


def quantize(w: jax.Array, bits: Any, r: Any | None = None, *, learned_range: bool = False
             ) -> jax.Array:
    """``Q(w)`` on the mid-rise grid of ``bits`` with range ``r`` (default: per-output-channel
    max-abs of ``w``), with the straight-through gradient of the module doc; dtype of ``w``, at
    least float32 (:func:`quantized_dtype`).

    ``learned_range``: ``r`` is a trainable clip (gradients flow to it and ``w`` outside ``[-r, r]``
    gets none); otherwise ``r`` is treated as a constant and ``dQ/dw = 1``. Concrete ``bits``
    outside the whole numbers 1..8, or a negative or non-finite ``r``, raise ValueError."""
    check_bits("bits", bits)
    check_range("r", r)
    w = jnp.asarray(w)
    wf = w.astype(jnp.float32)
    bits = jnp.asarray(bits, jnp.float32)
    if r is None:
        r = max_abs_range(wf)
    r = jnp.asarray(r, jnp.float32)
    o = offset(bits)
    if not learned_range:
        r = jax.lax.stop_gradient(r)
        q = codes(wf, bits, r)
        hard = (q - o) * (r / o)
        return (wf + jax.lax.stop_gradient(hard - wf)).astype(quantized_dtype(w.dtype))
    delta = r / o
    safe = jnp.where(delta > 0, delta, 1.0)
    # x lies in [0, 2o] (w is clipped), so round(x) is a code; no clip after the rounding (a clip
    # whose bound equals its input would halve the straight-through gradient there)
    x = clip_ste(wf, -r, r) / safe + o
    return ((_round_ste(x) - o) * delta).astype(quantized_dtype(w.dtype))


def bits_from_logits(logits: Any, b_min: float, b_max: float) -> jax.Array:
    """The learned width ``b = b_min + (b_max - b_min) * sigmoid(theta)``: smooth, strictly inside
    ``(b_min, b_max)``, so the bound never stops a gradient (a clip would freeze a channel there).
    ``1 <= b_min < b_max <= 8`` (ValueError otherwise)."""
    if not (isinstance(b_min, jax.core.Tracer) or isinstance(b_max, jax.core.Tracer)):
        check_bits("b_min, b_max", [b_min, b_max], integer=False)
        if not b_min < b_max:
            raise ValueError(f"b_min must be below b_max, got b_min={b_min}, b_max={b_max}")
    return b_min + (b_max - b_min) * jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))


def logits_for_bits(bits: float, b_min: float, b_max: float) -> float:
    """Inverse of :func:`bits_from_logits` (``bits`` strictly inside ``(b_min, b_max)``)."""
    if not b_min < bits < b_max:
        raise ValueError(f"b_init must lie strictly inside (b_min, b_max) = ({b_min}, {b_max}) "
                         f"(the sigmoid never reaches its bounds), got {bits}")
    p = (bits - b_min) / (b_max - b_min)
    return math.log(p / (1.0 - p))


__all__ = ["MAX_BITS", "MIN_BITS", "bits_from_logits", "check_bits", "check_range", "codes",
           "logits_for_bits", "max_abs_range", "offset", "quantize", "step_size"]
