"""Shared wide ResNets, SWRN-L-w-k (Savarese & Maire, arXiv 1902.09701, official grouping).

A SWRN is the pre-activation WRN-L-w of :class:`pae.models.WideResNet` under the
:func:`~pae.sharing.templates` transform with the official code's groups: one bank per stage,
shared by both 3x3 convs of blocks 2..N (N = (L - 4) / 6, so 2(N - 1) layers per bank); the first
block of each stage (stride, channel change, 1x1 shortcut), the stem, BatchNorm and the classifier
stay unshared. ``k`` templates per bank (the same for the three banks). Parameter counts on 10
classes (the official code's; the latent's leaves: unshared weights + banks + coefficients):
WRN-28-10 36,479,194; SWRN-28-10-1 12,287,212; -2 17,125,630; -4 26,802,466; -6 36,479,302
(= WRN-28-10 + 108 coefficients); SWRN-28-4-2 2,752,510.
"""
from __future__ import annotations

import dataclasses
import numbers
import re

from pae.core import Transform, select as pselect
from pae.models import WideResNet
from pae.sharing.bank import templates

STAGES = ("stage1", "stage2", "stage3")


def _blocks(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 16 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4 with n >= 2 (16, 22, 28, 40, ...) so that a stage has a "
                         f"block to share, got {depth!r}")
    return (depth - 4) // 6


def wrn_groups(depth: int) -> dict[str, pselect.Selector]:
    """The official groups of a :class:`pae.models.WideResNet` of ``depth``: ``{"stage1": ...,
    "stage2": ..., "stage3": ...}``, each selecting ``Conv_0`` and ``Conv_1`` of blocks 2..N of its
    stage (``WideBlock_{sN+1} .. WideBlock_{sN+N-1}``)."""
    n = _blocks(depth)
    out = {}
    for s, name in enumerate(STAGES):
        ids = "|".join(str(s * n + b) for b in range(1, n))
        out[name] = pselect.path(rf"^WideBlock_({ids})/Conv_[01]/kernel$")
    return out


@dataclasses.dataclass(frozen=True)
class SWRN:
    """SWRN-``depth``-``widen``-``k``: ``model`` (the plain WRN the transform feeds) and
    ``transform`` (its :func:`templates` transform); ``name`` as ``"SWRN-28-10-2"``."""

    depth: int
    widen: int
    k: int
    num_classes: int = 10
    pull: float = 0.0

    def __post_init__(self):
        _blocks(self.depth)
        for field in ("widen", "k", "num_classes"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{field} must be an int >= 1, got {v!r}")

    @property
    def name(self) -> str:
        return f"SWRN-{self.depth}-{self.widen}-{self.k}"

    @property
    def blocks(self) -> int:
        """N, the blocks per stage."""
        return _blocks(self.depth)

    @property
    def model(self) -> WideResNet:
        return WideResNet(self.depth, self.widen, self.num_classes)

    @property
    def transform(self) -> Transform:
        return templates(wrn_groups(self.depth), self.k, pull=self.pull, pull_period=2)


_NAME = re.compile(r"^s?wrn[-_]?(\d+)[-_](\d+)[-_](\d+)$", re.IGNORECASE)


def swrn(name_or_depth, widen: int | None = None, k: int | None = None, num_classes: int = 10,
         **kwargs) -> SWRN:
    """``swrn("SWRN-28-10-2")`` (or ``"swrn28_10_2"``) or ``swrn(28, 10, 2)``."""
    if isinstance(name_or_depth, str):
        m = _NAME.match(name_or_depth.strip())
        if not m or widen is not None or k is not None:
            raise ValueError(f"a SWRN name is 'SWRN-<depth>-<widen>-<k>' (e.g. 'SWRN-28-10-2'), got "
                             f"{name_or_depth!r}")
        return SWRN(int(m[1]), int(m[2]), int(m[3]), num_classes, **kwargs)
    if widen is None or k is None:
        raise ValueError("swrn(depth, widen, k) needs all three (or a name such as 'SWRN-28-10-2')")
    return SWRN(name_or_depth, widen, k, num_classes, **kwargs)


__all__ = ["STAGES", "SWRN", "swrn", "wrn_groups"]
