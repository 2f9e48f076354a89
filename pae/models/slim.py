"""Slim ResNets and VGGs: the dense nets that structured sparsification extracts.

Each takes one width per layer (and the ResNets an explicit list of the blocks they keep) and names
its modules exactly as the original does: :class:`SlimResNet` as :class:`pae.models.CifarResNet`
(``Conv_0``, ``BatchNorm_0``, ``BasicBlock_<k>/Conv_1``, ``BasicBlock_<k>/shortcut``, ``Dense_0``
...), :class:`SlimBottleneckResNet` as the bottleneck :class:`pae.models.ResNet` (ResNet-50:
``Bottleneck_<k>/Conv_2``, ``Bottleneck_<k>/shortcut_bn`` ...), :class:`SlimVGG` as
:class:`pae.models.VGG`; so a slim net at full width holds the same parameter tree as the original
and computes the same function.
Used by :func:`pae.growth.extraction.extract` (Yuan, Savarese & Maire, arXiv 2007.15353).
"""
from __future__ import annotations

import functools

from flax import linen as nn

from pae.models import init

_conv = functools.partial(init.conv, kernel_init=init.xavier_normal)
_conv_fan_out = functools.partial(init.conv, kernel_init=init.kaiming_normal_fan_out)


def _check_width(model: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{model}: {name} must be an int >= 1, got {value!r}")


class SlimBlock(nn.Module):
    """Post-activation basic block ``relu(x' + bn(conv(relu(bn(conv(x))))))`` with ``mid`` channels
    inside; ``x'`` is ``x`` or, when ``stride != 1`` or the widths differ, a 1x1 conv without BN."""

    mid: int
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        y = _conv(self.mid, 3, self.stride, name="Conv_0")(x)
        y = nn.relu(init.batch_norm_masked(y, train, mask, name="BatchNorm_0"))
        y = init.batch_norm_masked(_conv(self.features, 3, name="Conv_1")(y), train, mask,
                                   name="BatchNorm_1")
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, name="shortcut")(x)
        return nn.relu(x + y)


class SlimResNet(nn.Module):
    """A CIFAR ResNet with per-stage stream widths and per-block inner widths.

    ``streams``: the residual stream width of each of the three stages (the stem writes stage 0's).
    ``blocks``: ``((index, stage, mid), ...)`` in order: block ``index`` (its module is named
    ``BasicBlock_<index>``, the index in the full net) of ``stage`` with ``mid`` inner channels. The
    first block of stages 1 and 2 downsamples (stride 2, 1x1 conv shortcut), as in CifarResNet; each
    stage needs one. ``SlimResNet.like(CifarResNet(d, n, w))`` is the same net.
    """

    streams: tuple[int, int, int] = (16, 32, 64)
    blocks: tuple[tuple[int, int, int], ...] = ()
    num_classes: int = 10

    @staticmethod
    def like(model) -> "SlimResNet":
        """The slim description of a :class:`pae.models.CifarResNet` (all blocks, full widths)."""
        n = (model.depth - 2) // 6
        blocks = tuple((s * n + b, s, model.widths[s]) for s in range(3) for b in range(n))
        return SlimResNet(tuple(model.widths), blocks, model.num_classes)

    def _check(self):
        if len(self.streams) != 3:
            raise ValueError(f"SlimResNet: streams must be 3 widths, got {self.streams!r}")
        for s, w in enumerate(self.streams):
            _check_width("SlimResNet", f"streams[{s}]", w)
        stages = [b[1] for b in self.blocks]
        if stages != sorted(stages) or any(s not in (0, 1, 2) for s in stages) or \
                not all(s in stages for s in (1, 2)):
            raise ValueError(f"SlimResNet: blocks must be ordered by stage (0, 1, 2) with at least "
                             f"one block in stages 1 and 2, got stages {stages}")
        for index, stage, mid in self.blocks:
            _check_width("SlimResNet", f"mid of block {index}", mid)

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "SlimResNet")
        self._check()
        x = nn.relu(init.batch_norm_masked(_conv(self.streams[0], 3, name="Conv_0")(x), train, mask,
                                           name="BatchNorm_0"))
        previous = 0
        for index, stage, mid in self.blocks:
            stride = 2 if stage != previous else 1
            previous = stage
            x = SlimBlock(mid, self.streams[stage], stride, name=f"BasicBlock_{index}")(x, train, mask)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=init.xavier_normal, name="Dense_0")(x)


class SlimBottleneck(nn.Module):
    """Bottleneck ``relu(x' + bn(conv1x1(relu(bn(conv3x3_s(relu(bn(conv1x1(x)))))))))`` with ``mid``
    = (1x1-reduce width, 3x3 width) inside and ``features`` out, stride on the 3x3 (ResNet v1.5);
    ``x'`` is ``x`` or, with ``projection``, ``bn(conv1x1_s(x))`` (decided by the flag, not by the
    widths, so a thinned net keeps the original's shortcut kinds)."""

    mid: tuple[int, int]
    features: int
    stride: int = 1
    projection: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        y = nn.relu(init.batch_norm_masked(_conv_fan_out(self.mid[0], 1, name="Conv_0")(x), train, mask,
                                           name="BatchNorm_0"))
        y = nn.relu(init.batch_norm_masked(_conv_fan_out(self.mid[1], 3, self.stride, name="Conv_1")(y),
                                           train, mask, name="BatchNorm_1"))
        y = init.batch_norm_masked(_conv_fan_out(self.features, 1, name="Conv_2")(y), train, mask,
                                   name="BatchNorm_2")
        if self.projection:
            x = init.batch_norm_masked(
                _conv_fan_out(self.features, 1, self.stride, name="shortcut_conv")(x), train, mask,
                name="shortcut_bn")
        return nn.relu(x + y)


class SlimBottleneckResNet(nn.Module):
    """An ImageNet bottleneck ResNet (ResNet-50 layout, :class:`pae.models.ResNet` with
    ``bottleneck=True``) with free widths: 7x7/2 stem conv + BN + ReLU + 3x3/2 max-pool, stages of
    bottlenecks, global average pool, one FC layer (PyTorch default init; convs Kaiming-normal
    fan-out, as the original).

    ``stem``: the stem's width. ``streams``: the residual (expanded) width of each stage.
    ``blocks``: ``((index, stage, mid0, mid1), ...)`` in order: block ``index`` (module
    ``Bottleneck_<index>``, its index in the full net) of ``stage`` with ``mid0`` 1x1-reduce and
    ``mid1`` 3x3 channels. The first listed block of every stage has the projection shortcut (stride
    2 from stage 1 on) and every stage needs one. ``SlimBottleneckResNet.like(ResNet((3, 4, 6, 3),
    True))`` is ResNet-50.
    """

    stem: int = 64
    streams: tuple[int, ...] = (256, 512, 1024, 2048)
    blocks: tuple[tuple[int, int, int, int], ...] = ()
    num_classes: int = 1000

    @staticmethod
    def resnet(stage_sizes, base: int = 64, num_classes: int = 1000) -> "SlimBottleneckResNet":
        """The full bottleneck ResNet with ``stage_sizes`` blocks per stage at base width ``base``
        (stage ``s``: ``base * 2**s`` inside, 4x that out; ``base=64``: torchvision's)."""
        _check_width("SlimBottleneckResNet", "base", base)
        blocks, index = [], 0
        for s, n in enumerate(stage_sizes):
            for _ in range(n):
                blocks.append((index, s, base * 2 ** s, base * 2 ** s))
                index += 1
        return SlimBottleneckResNet(base, tuple(4 * base * 2 ** s for s in range(len(stage_sizes))),
                                    tuple(blocks), num_classes)

    @staticmethod
    def like(model) -> "SlimBottleneckResNet":
        """The slim description of a bottleneck :class:`pae.models.ResNet` (all blocks, full widths)."""
        if not getattr(model, "bottleneck", False):
            raise ValueError(f"SlimBottleneckResNet.like needs a pae.models.ResNet with bottleneck=True, "
                             f"got {type(model).__name__} with bottleneck="
                             f"{getattr(model, 'bottleneck', None)!r}")
        return SlimBottleneckResNet.resnet(tuple(model.stage_sizes), 64, model.num_classes)

    def _check(self):
        _check_width("SlimBottleneckResNet", "stem", self.stem)
        if len(self.streams) < 1:
            raise ValueError("SlimBottleneckResNet: streams must hold one width per stage, got ()")
        for s, w in enumerate(self.streams):
            _check_width("SlimBottleneckResNet", f"streams[{s}]", w)
        stages = [b[1] for b in self.blocks]
        if stages != sorted(stages) or sorted(set(stages)) != list(range(len(self.streams))):
            raise ValueError(f"SlimBottleneckResNet: blocks must be ordered by stage with at least one "
                             f"block in each of the {len(self.streams)} stages, got stages {stages}")
        for block in self.blocks:
            if len(block) != 4:
                raise ValueError(f"SlimBottleneckResNet: a block is (index, stage, mid0, mid1), got {block!r}")
            _check_width("SlimBottleneckResNet", f"mid0 of block {block[0]}", block[2])
            _check_width("SlimBottleneckResNet", f"mid1 of block {block[0]}", block[3])

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "SlimBottleneckResNet")
        self._check()
        x = nn.relu(init.batch_norm_masked(_conv_fan_out(self.stem, 7, 2, name="Conv_0")(x), train, mask,
                                           name="BatchNorm_0"))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        previous = None
        for index, stage, mid0, mid1 in self.blocks:
            first = stage != previous
            stride = 2 if first and stage > 0 else 1
            previous = stage
            x = SlimBottleneck((mid0, mid1), self.streams[stage], stride, first,
                               name=f"Bottleneck_{index}")(x, train, mask)
        x = x.mean(axis=(1, 2))
        return init.torch_dense(self.num_classes, x.shape[-1], name="Dense_0")(x)


class SlimVGG(nn.Module):
    """A VGG-like net: ``config`` holds conv widths (3x3, bias, BN, ReLU) and ``"M"`` (2x2 max-pool);
    global average pool and one FC layer, PyTorch default initialization, as :class:`pae.models.VGG`
    (``SlimVGG(pae.models.vgg.CONFIGS[16])`` is VGG-16). Inputs need ``2 ** pools`` pixels a side."""

    config: tuple = (64, "M", 128, "M")
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "SlimVGG")
        pools = sum(1 for item in self.config if item == "M")
        init.check_min_size(x, "SlimVGG", 2 ** pools, f"{2 ** pools}x{2 ** pools} inputs ({pools} pools)")
        i = 0
        for item in self.config:
            if item == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            _check_width("SlimVGG", f"config width {i}", item)
            fan_in = x.shape[-1] * 9
            x = nn.Conv(item, (3, 3), padding=1, kernel_init=init.torch_default,
                        bias_init=init.torch_default_bias(fan_in), name=f"Conv_{i}")(x)
            x = nn.relu(init.batch_norm_masked(x, train, mask, name=f"BatchNorm_{i}"))
            i += 1
        x = x.mean(axis=(1, 2))
        return init.torch_dense(self.num_classes, x.shape[-1], name="Dense_0")(x)
