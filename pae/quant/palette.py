"""Palette assignment between the phases: each layer snaps to two levels (or one), each channel to one.

SONIQ (arXiv 2311.14114): two precision levels per layer suffice, one in 1..4 bits and one in 4..8;
each channel takes one. How the levels are chosen was not retrievable; this is the reconstruction
used here, named ``"implied-sensitivity"``:

Phase 1 ends near a stationary point of ``loss + lambda * size``. Model the loss's dependence on
channel ``c``'s noise as linear in its variance, ``g_c * sigma^2(b)``, with
``sigma^2(b) = delta(b)^2 / 12`` and ``delta(b) = 2R / (2**b - 1)``. Stationarity at the learned
``b_c`` gives the sensitivity ``g_c`` up to the common factor ``lambda * n_c``, and the cost of giving
the channel ``a`` bits, in bits (size + the distortion it buys, in the same currency), is

    cost_c(a) = n_c * (a + gamma * kappa(b_c) * ((2**b_c - 1) / (2**a - 1))**2),
    kappa(b)  = (2**b - 1) / (2 ln 2 * 2**b),

which is minimal exactly at ``a = b_c`` (``gamma = 1``), and charges rounding down (exponentially
more noise) more than rounding up (linearly more bits). ``gamma`` (``distortion_weight``) trades
distortion against size. For every candidate palette ``(l, h)`` with ``l`` in ``low`` and ``h`` in
``high``, each channel takes its cheaper level and the palette's cost is the sum plus, when both
levels are used, the storage of the second segment (``count_overhead``; input-channel widths: its
float32 scale per output column and an int32 permutation entry per K row; output-channel widths: an
int32 permutation entry per output column, the scales being per column anyway); each level
alone (every channel at ``l``, or every channel at ``h``) is a candidate too, one segment with no
overhead. The cheapest palette wins (ties: the lower levels).
``levels=1`` searches one level in ``[low[0], high[1]]`` (the uniform comparison).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from pae.core import map_nodes
from pae.quant import noise as qn
from pae.quant import quantizer as qz


def _check_range(name: str, value: Any) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value)
        ok = all(float(v) == int(v) for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok or not qz.MIN_BITS <= lo <= hi <= qz.MAX_BITS:
        raise ValueError(f"{name} must be a pair of whole bit widths (lo, hi) with "
                         f"{qz.MIN_BITS} <= lo <= hi <= {qz.MAX_BITS}, got {value!r}")
    return lo, hi


def level_cost(bits: Any, levels: Any, distortion_weight: float = 1.0) -> np.ndarray:
    """Per-weight cost ``a + gamma * kappa(b) * ((2**b - 1)/(2**a - 1))**2`` (module doc), float64,
    shape ``bits.shape + levels.shape`` (``bits`` the learned widths, ``levels`` the candidates)."""
    b = np.asarray(bits, np.float64)[..., None]
    a = np.asarray(levels, np.float64)
    kappa = (np.exp2(b) - 1) / (2 * math.log(2) * np.exp2(b))
    return a + distortion_weight * kappa * ((np.exp2(b) - 1) / (np.exp2(a) - 1)) ** 2


def choose_palette(bits: Any, weights_per_channel: int, *, levels: int = 2,
                   low: Sequence[int] = (1, 4), high: Sequence[int] = (4, 8),
                   distortion_weight: float = 1.0, overhead_bits: float = 0.0,
                   fixed: Sequence[int] | None = None) -> tuple[tuple[int, ...], np.ndarray]:
    """The palette of one layer and each channel's level, on the host (module doc).

    Args:
      bits: the learned widths (C,). weights_per_channel: ``n_c`` (equal for all channels of a layer).
      levels: 2 (two-level palette) or 1 (uniform). low, high: the ranges of the two levels.
      overhead_bits: extra storage of a palette that uses both levels.
      fixed: force the palette (``(l, h)`` or ``(a,)``); each level must lie in its range.
    Returns ``(palette, assigned)``: the levels in use (ascending; one level when ``levels=1``, or
    when every channel takes the same level) and the (C,) float32 level of each channel.
    """
    b = np.asarray(bits, np.float64)
    if b.ndim != 1 or b.size == 0 or not np.all(np.isfinite(b)):
        raise ValueError(f"bits must be a non-empty 1-D array of finite widths, got shape {b.shape}")
    qz.check_bits("bits", b, integer=False)
    if isinstance(weights_per_channel, bool) or not isinstance(weights_per_channel, (int, np.integer)) \
            or weights_per_channel < 1:
        raise ValueError(f"weights_per_channel must be an int >= 1, got {weights_per_channel!r}")
    for name, value in (("distortion_weight", distortion_weight), ("overhead_bits", overhead_bits)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if isinstance(levels, bool) or levels not in (1, 2):
        raise ValueError(f"levels must be 1 (uniform) or 2 (two-level palette), got {levels!r}")
    low, high = _check_range("low", low), _check_range("high", high)
    if fixed is not None:
        fixed = tuple(fixed)
        if len(fixed) != levels:
            raise ValueError(f"fixed must hold {levels} level(s), got {fixed!r}")
        qz.check_bits("fixed palette level", fixed)
        ranges = [(low[0], high[1])] if levels == 1 else [low, high]
        for lvl, (lo, hi), name in zip(fixed, ranges, ("low", "high")):
            if not lo <= lvl <= hi:
                raise ValueError(f"fixed palette {fixed!r}: level {lvl} is outside its range "
                                 f"[{lo}, {hi}] ({name if levels == 2 else 'uniform'})")
        candidates = [tuple(int(v) for v in fixed)]
    elif levels == 1:
        candidates = [(a,) for a in range(low[0], high[1] + 1)]
    else:
        pairs = [(lo, hi) for lo in range(low[0], low[1] + 1)
                 for hi in range(high[0], high[1] + 1) if lo <= hi]
        if not pairs:
            raise ValueError(f"no palette (l, h) with l in {low}, h in {high} and l <= h")
        # a pair's levels used alone are candidates too: all channels at ``h`` (no second segment,
        # no overhead) can be cheaper than the split in which some channels prefer ``l``
        candidates = sorted({tuple(sorted(set(c))) for p in pairs for c in (p, p[:1], p[1:])})
    best = None
    for cand in candidates:
        lv = np.asarray(sorted(set(cand)), np.float64)
        cost = level_cost(b, lv, distortion_weight) * weights_per_channel     # (C, L)
        pick = np.argmin(cost, axis=1)          # ties: the lower level
        total = float(cost[np.arange(b.size), pick].sum())
        if len(np.unique(pick)) > 1:
            total += overhead_bits
        if best is None or total < best[0] - 1e-9 * abs(best[0]):
            best = (total, lv[pick])
    assigned = best[1]
    return tuple(int(v) for v in np.unique(assigned)), assigned.astype(np.float32)


def assign_palette(latent: Any, *, levels: int = 2, low: Sequence[int] = (1, 4),
                   high: Sequence[int] = (4, 8), distortion_weight: float = 1.0,
                   count_overhead: bool = True, fixed: Sequence[int] | None = None,
                   act_fixed: Sequence[int] | None = None) -> Any:
    """Every :class:`~pae.quant.NoisyWeight` of ``latent`` becomes a :class:`~pae.quant.QuantWeight`
    holding the palette :func:`choose_palette` picks from its learned widths (same weight, same
    range). Pure and host-side (NumPy); the transition into phase 2.

    Every :class:`~pae.quant.NoisyAct` (activation widths) likewise becomes a
    :class:`~pae.quant.QuantAct` with the same ``levels``, ``low``, ``high`` and
    ``distortion_weight`` (one weight per channel, no overhead: the activation quantizer stores a
    scale and an offset per channel whatever the palette), or the palette ``act_fixed``."""
    if not np.isfinite(distortion_weight) or distortion_weight < 0:
        raise ValueError(f"distortion_weight must be finite and >= 0, got {distortion_weight}")
    found = []

    def snap(n: qn.NoisyWeight):
        found.append(n)
        c, per = qn.channel_sizes(n)
        k_rows, n_cols = qn.gemm_shape(n)
        overhead = 0.0
        if count_overhead:       # module doc: a scale (input widths) or a permutation entry per column
            overhead = 32.0 * n_cols
            if n.axis == -2:
                overhead += 32.0 * k_rows
        palette, assigned = choose_palette(
            np.asarray(qn.learned_bits(n)), per, levels=levels, low=low, high=high,
            distortion_weight=distortion_weight, overhead_bits=overhead, fixed=fixed)
        # ``levels`` keeps one shape per layer: a palette using one level repeats it
        padded = palette + (palette[-1],) * (levels - len(palette))
        return qn.QuantWeight(n.weight, jnp.asarray(assigned), jnp.asarray(padded, jnp.float32),
                              n.log_range, n.axis, n.k_axes, n.wshape)

    from pae.quant import activations as qa

    def snap_act(n: qa.NoisyAct):
        palette, assigned = choose_palette(
            np.asarray(qa.act_bits(n)), 1, levels=levels, low=low, high=high,
            distortion_weight=distortion_weight, fixed=act_fixed)
        padded = palette + (palette[-1],) * (levels - len(palette))
        return qa.QuantAct(jnp.asarray(assigned), jnp.asarray(padded, jnp.float32), n.log_scale,
                           n.grid, n.momentum)

    out = map_nodes(snap_act, map_nodes(snap, latent, qn.NoisyWeight), qa.NoisyAct)
    if not found:
        raise ValueError("latent has no NoisyWeight node: nothing to assign a palette to "
                         "(build it with pae.quant.noise_injection(...).init)")
    return out


__all__ = ["assign_palette", "choose_palette", "level_cost"]
