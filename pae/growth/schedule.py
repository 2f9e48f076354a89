"""Width and epoch schedules of incremental growth (Yuan, Savarese & Maire, arXiv 2306.12700).

Widths: start at ``start_fraction`` (1/4) of the final width, then
``C_t = min(C_final, C_{t-1} + max(2, round_even(p * C_{t-1})))`` with ``p = 0.2`` for ``steps = 8``
growth steps (9 width stages); ``round_even(x) = 2 * round(x / 2)`` because new units come in pairs.
Three details are pae's choice (the sources leave them open): the increment is at least one pair (a
4-channel start would otherwise never grow), and the last growth step lands on the final width (the
last stage always trains the full network), and the start width keeps the final width's parity
(the nearest such integer to ``start_fraction * C_final``). Example, a 64-channel stage:
16, 20, 24, 28, 34, 40, 48, 58, 64.

``multiple`` (pae's option, not the paper's; default 2, the paper's schedule): every width before
the last is the paper's, rounded to the nearest multiple of ``multiple`` (halves up), within
``[multiple, C_final]`` and never below the stage before: sizes the backends run fast (XLA's CPU
convolutions, tensor cores). With 8 the 64-channel stage reads 16, 24, 24, 32, 32, 40, 48, 56, 64.

Stage durations: ``"exponential"``: ``T_t = T_{t-1} + round(p_T * T_{t-1})`` from ``T_0`` (the
"stage durations" reading of the paper's schedule, sharing_and_growth.md section 2.1);
``"fixed"``: every stage ``T_0``. With ``total`` the last stage gets what is left.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping

import numpy as np

EPOCH_SCHEDULES = ("exponential", "fixed")


def round_even(x: float) -> int:
    """``2 * round(x / 2)`` (numpy's round half to even)."""
    return int(2 * np.round(x / 2))


def width_schedule(final: Mapping[str, int], *, start_fraction: float = 0.25, growth: float = 0.2,
                   steps: int = 8, multiple: int = 2) -> list[dict[str, int]]:
    """The widths of each of the ``steps + 1`` stages, per group (see the module doc).

    The start width is the integer nearest ``start_fraction * C_final`` with the parity of
    ``C_final`` (every increment is even; at least 1): 64 -> 16, 12 -> 4, 20 -> 4. The last stage
    is the final width, so ``steps=0`` is one stage at the final width (no growth). ``multiple``
    (even): round the earlier stages to multiples of it (a group no wider than it starts full);
    above 2 every final width must be even, so that each increment is whole pairs.
    """
    if not 0 < start_fraction <= 1:
        raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction!r}")
    if not growth > 0:
        raise ValueError(f"growth must be > 0, got {growth!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 2 \
            or multiple % 2:
        raise ValueError(f"multiple must be an even int >= 2 (new units come in pairs), got {multiple!r}")
    per_group = {}
    for g, c_final in final.items():
        if isinstance(c_final, bool) or not isinstance(c_final, (int, np.integer)) or c_final < 1:
            raise ValueError(f"final: the width of group {g!r} must be an int >= 1, got {c_final!r}")
        if multiple > 2 and c_final % 2:
            raise ValueError(f"final: group {g!r} has an odd width {c_final}; multiple={multiple} "
                             f"rounds every stage to even widths, so it would grow by an odd number")
        c = int(c_final - round_even(c_final - start_fraction * c_final))
        if c < 1:
            c = 2 - c_final % 2
        widths = [c if steps else c_final]
        for t in range(1, steps + 1):
            c = c_final if t == steps else min(c_final, c + max(2, round_even(growth * c)))
            widths.append(c)
        if multiple > 2:
            widths = _round_to_multiple(widths, multiple)
        per_group[g] = widths
    return [{g: w[t] for g, w in per_group.items()} for t in range(steps + 1)]


def _round_to_multiple(widths: list[int], multiple: int) -> list[int]:
    """Every width but the last to the nearest multiple (halves up), within ``[multiple, last]``,
    never below the one before."""
    last, out = widths[-1], []
    for c in widths[:-1]:
        r = min(last, max(multiple, multiple * int(np.floor(c / multiple + 0.5))))
        out.append(max(r, out[-1]) if out else r)
    return out + [last]


def check_growth(name: str, growth) -> None:
    """TypeError unless ``growth`` is a real number, ValueError unless it is finite and >= 0."""
    if isinstance(growth, bool) or not isinstance(growth, numbers.Real):
        raise TypeError(f"{name} must be a finite number >= 0, got {type(growth).__name__} {growth!r}")
    if not (math.isfinite(growth) and growth >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {growth!r}")


def stage_epochs(stages: int, first: int, *, growth: float = 0.2, kind: str = "exponential",
                 total: int | None = None) -> list[int]:
    """Epochs of each of ``stages`` stages (see the module doc; ``growth`` finite and >= 0);
    ``total`` (an int): the last stage gets the rest (ValueError when the earlier stages already
    take ``total`` or more)."""
    if kind not in EPOCH_SCHEDULES:
        raise ValueError(f"kind must be one of {EPOCH_SCHEDULES}, got {kind!r}")
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an int >= 1, got {stages!r}")
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"first must be an int >= 0, got {first!r}")
    check_growth("growth", growth)
    if total is not None and (isinstance(total, bool) or not isinstance(total, numbers.Integral)):
        raise TypeError(f"total must be an int or None, got {type(total).__name__} {total!r}")
    epochs = [first]
    for _ in range(stages - 1):
        epochs.append(epochs[-1] if kind == "fixed" else epochs[-1] + int(np.round(growth * epochs[-1])))
    if total is not None:
        rest = int(total) - sum(epochs[:-1])
        if rest < 1:
            raise ValueError(f"total={total} epochs leave nothing for the last stage: the first "
                             f"{stages - 1} stages take {sum(epochs[:-1])} ({epochs[:-1]})")
        epochs[-1] = rest
    return epochs


__all__ = ["EPOCH_SCHEDULES", "round_even", "stage_epochs", "width_schedule"]
