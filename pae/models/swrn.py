"""A wide ResNet with real loops: the folded form of a SWRN (Savarese & Maire, arXiv 1902.09701).

:class:`LoopedWideResNet` is :class:`pae.models.WideResNet` (pre-activation, same stem, first block
of each stage, head and initializers, same parameter names for them) in which blocks 2..N of each
stage are replaced by *loops*: a :class:`SharedLoop` holds one pair of 3x3 kernels and applies the
block body ``x + conv2(relu(bn_r2(conv1(relu(bn_r1(x))))))`` ``repeats`` times under ``nn.scan``
(compiled once), each repeat ``r`` with its own two BatchNorms (stacked on a leading axis). The
loop counts are static (``loops``: per stage, the repeats of each of its loops), so a net folded
from depth L can run more iterations at test time (:func:`pae.sharing.with_repeats`).
"""
from __future__ import annotations

import functools

import jax
from flax import linen as nn

from pae.models import init
from pae.models.wrn import WideBlock

_conv = functools.partial(init.conv, kernel_init=init.kaiming_normal)


def conv3x3(x, kernel):
    """Stride-1 3x3 conv with padding 1 on NHWC inputs, HWIO kernel (what ``nn.Conv`` computes)."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class _Repeat(nn.Module):
    """One repeat of the loop body, with its own BatchNorms; the kernels come in as arguments."""

    train: bool = False

    @nn.compact
    def __call__(self, x, kernels, mask):
        k1, k2 = kernels
        y = conv3x3(nn.relu(init.batch_norm_masked(x, self.train, mask)), k1)
        y = conv3x3(nn.relu(init.batch_norm_masked(y, self.train, mask)), k2)
        return x + y, None


class SharedLoop(nn.Module):
    """``repeats`` pre-activation blocks sharing ``kernel1``/``kernel2`` (one ``nn.scan``); the
    per-repeat BatchNorm parameters and statistics live under ``body`` with a leading repeat axis."""

    features: int
    repeats: int

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        if x.shape[-1] != self.features:
            raise ValueError(f"SharedLoop needs inputs with {self.features} channels, got {x.shape[-1]}")
        k1 = self.param("kernel1", init.kaiming_normal, (3, 3, self.features, self.features))
        k2 = self.param("kernel2", init.kaiming_normal, (3, 3, self.features, self.features))
        body = nn.scan(_Repeat, variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                       length=self.repeats)
        x, _ = body(train, name="body")(x, (k1, k2), mask)
        return x


class LoopedWideResNet(nn.Module):
    """WRN-``depth``-``widen`` whose shared blocks are loops; ``mask`` as in :class:`WideResNet`.

    ``loops``: per stage, a tuple of repeat counts (default one loop of N - 1 repeats per stage,
    N = (depth - 4) / 6). Parameter names: ``Conv_0`` (stem), ``WideBlock_{sN}`` (first block of
    stage s, as in :class:`WideResNet`), ``Loop_{s}_{j}`` (loop j of stage s), ``BatchNorm_0``,
    ``Dense_0``.
    """

    depth: int = 28
    widen: int = 10
    num_classes: int = 10
    loops: tuple = ()

    def stage_loops(self) -> tuple:
        if (self.depth - 4) % 6 or self.depth < 10:
            raise ValueError(f"depth must be 6n+4 (16, 22, 28, 40, ...), got {self.depth}")
        n = (self.depth - 4) // 6
        loops = tuple(tuple(int(r) for r in stage) for stage in self.loops) if self.loops else \
            ((n - 1,) if n > 1 else (),) * 3
        if len(loops) != 3 or any(r < 1 for stage in loops for r in stage):
            raise ValueError(f"loops must give 3 stages of repeat counts >= 1, got {self.loops!r}")
        return loops

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "LoopedWideResNet")
        loops = self.stage_loops()
        n = (self.depth - 4) // 6
        x = _conv(16, 3)(x)
        for stage, base in enumerate((16, 32, 64)):
            features = base * self.widen
            x = WideBlock(features, 2 if stage > 0 else 1, name=f"WideBlock_{stage * n}")(x, train, mask)
            for j, repeats in enumerate(loops[stage]):
                x = SharedLoop(features, repeats, name=f"Loop_{stage}_{j}")(x, train, mask)
        x = nn.relu(init.batch_norm_masked(x, train, mask)).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=init.kaiming_normal)(x)


__all__ = ["LoopedWideResNet", "SharedLoop", "conv3x3"]
