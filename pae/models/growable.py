"""Width-parameterized models for growth (``pae.growth``): a CIFAR ResNet, a VGG-like net and
MobileNetV1.

Each model names its modules explicitly and describes its channel structure for
:func:`pae.growth.grow`:

* ``groups() -> {group: width}``: the widths that can grow (a ResNet stage's residual stream and
  every conv inside it share one group; every VGG conv is its own group);
* ``at_widths({group: width}) -> model``: the same architecture at other widths;
* ``growth_spec() -> tuple[GrowthLayer, ...]``: for every layer, the module path of its kernel
  (``(..., in, out)``, a ``bias`` if the module has one), the group of its input and output channels
  (``None``: fixed, e.g. the image channels or the classes) and the BatchNorm that normalizes its
  output (``None``: nothing does, so variance transfer changes the function there); ``depthwise``
  marks a depthwise conv (kernel ``(kh, kw, 1, C)``, channel multiplier 1, input and output both
  its one group).

All use He-normal (untruncated) conv kernels, N(0, 2 / fan_in), the same law
:func:`pae.growth.grow` draws new units from by default, and PyTorch-equivalent BatchNorm.
``mask`` keeps padding rows out of BatchNorm statistics as in every pae model.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

from flax import linen as nn

from pae.models import init


class GrowthLayer(NamedTuple):
    """One growable layer: ``kernel`` is the module path (its ``kernel`` leaf is ``(..., in, out)``),
    ``in_group`` / ``out_group`` the channel groups of its input / output axes (None: fixed size),
    ``norm`` the path of the BatchNorm module on its output (None: no normalization follows).

    ``depthwise``: a depthwise conv with channel multiplier 1 (``feature_group_count`` = its
    channels): the kernel is ``(kh, kw, 1, C)``, output channel ``c`` reads input channel ``c`` only,
    ``in_group == out_group``, and its fan-in is ``kh * kw`` whatever ``C`` is (see
    :func:`pae.growth.grow` for how such a layer grows)."""

    kernel: tuple[str, ...]
    in_group: str | None
    out_group: str | None
    norm: tuple[str, ...] | None
    depthwise: bool = False


def _check_widths(name: str, widths, n: int | None = None) -> tuple[int, ...]:
    widths = tuple(widths)
    if (n is not None and len(widths) != n) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ValueError(f"{name}: widths must be {n or 'some'} ints >= 1, got {widths}")
    return widths


def _widths_for(groups: Mapping[str, int], widths: Mapping[str, int], model: str) -> dict:
    if set(widths) != set(groups):
        raise ValueError(f"{model}.at_widths: widths must name exactly the groups {sorted(groups)}, "
                         f"got {sorted(widths)}")
    return dict(widths)


class _Block(nn.Module):
    """Post-activation basic block (as pae's CifarResNet): relu(bn(conv)) -> bn(conv), plus the
    identity or a 1x1 stride-s conv shortcut without BN, then relu."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        y = init.conv(self.features, 3, self.stride, name="conv1")(x)
        y = nn.relu(init.batch_norm_masked(y, train, mask, name="bn1"))
        y = init.batch_norm_masked(init.conv(self.features, 3, name="conv2")(y), train, mask, name="bn2")
        if self.stride != 1 or x.shape[-1] != self.features:
            x = init.conv(self.features, 1, self.stride, name="shortcut")(x)
        return nn.relu(x + y)


class GrowableResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` with one width per stage (``widths``, default the ResNet-20
    widths 16/32/64): stem conv+BN, three stages of ``n`` basic blocks (stride 2 at the first block
    of stages 2 and 3, 1x1 conv shortcut where the shape changes), global average pool, ``fc``.

    Groups ``stage0..2``: every conv of a stage writes to (or reads from) that stage's residual
    stream, so one width per stage keeps the identity shortcuts valid.
    """

    depth: int = 20
    num_classes: int = 10
    widths: tuple[int, int, int] = (16, 32, 64)

    def _blocks(self) -> int:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"GrowableResNet: depth must be 6n+2 >= 8 (8, 14, 20, 32, ...), got {self.depth}")
        return (self.depth - 2) // 6

    def groups(self) -> dict[str, int]:
        widths = _check_widths("GrowableResNet", self.widths, 3)
        return {f"stage{s}": w for s, w in enumerate(widths)}

    def at_widths(self, widths: Mapping[str, int]) -> "GrowableResNet":
        widths = _widths_for(self.groups(), widths, "GrowableResNet")
        return self.clone(widths=tuple(int(widths[f"stage{s}"]) for s in range(3)))

    def growth_spec(self) -> tuple[GrowthLayer, ...]:
        layers = [GrowthLayer(("stem",), None, "stage0", ("stem_bn",))]
        prev = "stage0"
        for s in range(3):
            g = f"stage{s}"
            for b in range(self._blocks()):
                blk = f"s{s}b{b}"
                layers += [GrowthLayer((blk, "conv1"), prev, g, (blk, "bn1")),
                           GrowthLayer((blk, "conv2"), g, g, (blk, "bn2"))]
                if s > 0 and b == 0:
                    layers.append(GrowthLayer((blk, "shortcut"), prev, g, None))
                prev = g
        layers.append(GrowthLayer(("fc",), prev, None, None))
        return tuple(layers)

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "GrowableResNet")
        blocks = self._blocks()
        widths = _check_widths("GrowableResNet", self.widths, 3)
        x = init.conv(widths[0], 3, name="stem")(x)
        x = nn.relu(init.batch_norm_masked(x, train, mask, name="stem_bn"))
        for s, features in enumerate(widths):
            for b in range(blocks):
                stride = 2 if s > 0 and b == 0 else 1
                x = _Block(features, stride, name=f"s{s}b{b}")(x, train, mask)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=init.kaiming_normal, name="fc")(x)


class GrowableVGG(nn.Module):
    """VGG-like net: ``layers`` lists conv widths and ``"M"`` (2x2 max-pool); each conv is a 3x3 conv
    with bias + BN + ReLU and its own group ``conv<i>``; global average pool, ``fc``. The default
    is VGG-11's layout."""

    layers: tuple = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
    num_classes: int = 10

    def _widths(self) -> tuple[int, ...]:
        return _check_widths("GrowableVGG", [w for w in self.layers if w != "M"])

    def groups(self) -> dict[str, int]:
        return {f"conv{i}": w for i, w in enumerate(self._widths())}

    def at_widths(self, widths: Mapping[str, int]) -> "GrowableVGG":
        widths = _widths_for(self.groups(), widths, "GrowableVGG")
        it = iter(int(widths[f"conv{i}"]) for i in range(len(self._widths())))
        return self.clone(layers=tuple(w if w == "M" else next(it) for w in self.layers))

    def growth_spec(self) -> tuple[GrowthLayer, ...]:
        n = len(self._widths())
        layers = [GrowthLayer((f"conv{i}",), f"conv{i - 1}" if i else None, f"conv{i}", (f"bn{i}",))
                  for i in range(n)]
        return tuple(layers) + (GrowthLayer(("fc",), f"conv{n - 1}", None, None),)

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "GrowableVGG")
        i = 0
        for item in self.layers:
            if item == "M":
                if min(x.shape[1:3]) < 2:
                    raise ValueError(f"GrowableVGG: inputs too small for {self.layers.count('M')} "
                                     f"2x2 pools, got {tuple(x.shape)}")
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            x = nn.Conv(item, (3, 3), padding=1, kernel_init=init.kaiming_normal,
                        bias_init=nn.initializers.zeros, name=f"conv{i}")(x)
            x = nn.relu(init.batch_norm_masked(x, train, mask, name=f"bn{i}"))
            i += 1
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=init.kaiming_normal, name="fc")(x)


#: MobileNetV1's stem width then its 13 depthwise-separable blocks' widths (Howard et al., Table 1)
MOBILENET_V1_WIDTHS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
#: the strides of the stem and of the 13 blocks' depthwise convs (ImageNet layout)
MOBILENET_V1_STRIDES = (2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)


def mobilenet_v1_widths(alpha: float = 1.0, widths=MOBILENET_V1_WIDTHS) -> tuple[int, ...]:
    """MobileNetV1's width multiplier: ``max(8, int(alpha * c))`` for every width (as
    :class:`pae.models.MobileNetV1`), e.g. ``GrowableMobileNetV1(10, mobilenet_v1_widths(0.25))``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    return tuple(max(8, int(c * alpha)) for c in _check_widths("mobilenet_v1_widths", widths))


class _SeparableBlock(nn.Module):
    """Depthwise 3x3 (stride ``stride``, channel multiplier 1) + BN + ReLU, then pointwise 1x1 to
    ``features`` + BN + ReLU; both convs bias-free."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        channels = x.shape[-1]
        x = nn.Conv(channels, (3, 3), (self.stride, self.stride), padding=1, use_bias=False,
                    feature_group_count=channels, kernel_init=init.kaiming_normal, name="dw")(x)
        x = nn.relu(init.batch_norm_masked(x, train, mask, name="dw_bn"))
        x = init.conv(self.features, 1, name="pw")(x)
        return nn.relu(init.batch_norm_masked(x, train, mask, name="pw_bn"))


class GrowableMobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al., arXiv 1704.04861): a 3x3 stem conv + BN + ReLU, depthwise-separable
    blocks (:class:`_SeparableBlock`, modules ``b<i>/dw``, ``dw_bn``, ``pw``, ``pw_bn``), global
    average pool, ``fc``. ``widths``: the stem's width then every block's pointwise width (default
    MobileNetV1's 32, 64, ..., 1024; :func:`mobilenet_v1_widths` applies a width multiplier);
    ``strides``: the stem's stride then every block's depthwise stride (default the ImageNet layout;
    e.g. a stem stride of 1 for 32x32 images). He-normal fan-in kernels (a depthwise kernel's fan-in
    is ``3 * 3 = 9``), no biases, a He-normal ``fc`` with zero bias.

    Groups ``stem`` and ``block0..`` (one per pointwise conv, plus the stem): a group's channels are
    written by its conv (the stem or block ``i``'s ``pw``), pass through the *next* block's depthwise
    conv channel by channel (the depthwise conv's input and output are that same group, so it is
    listed with ``depthwise=True``) and are read by the next pointwise conv (or ``fc``).

    Growing group ``g`` from ``n`` to ``m`` channels (:func:`pae.growth.grow`) therefore means: new
    output columns of the conv that writes ``g``, one new depthwise filter per new channel (channel
    multiplier 1), new input rows of the next pointwise conv. Function-preserving pairs go through
    the depthwise conv with *tied* filters: paired channels (equal after the writer, whose new
    columns are equal within a pair) get the same depthwise filter and identical fresh BatchNorm, so
    they stay equal, and the next pointwise conv's rows of the pair have opposite signs, so the pair
    cancels there. Variance transfer: the depthwise conv's fan-in ``kh * kw`` does not grow with
    ``g``, so its old filters and its BatchNorm statistics are not rescaled (factor 1); the next
    pointwise conv's fan-in ``1 * 1 * n`` grows to ``m`` and gets the usual factor (``sqrt(n / m)``
    by default). Every conv is followed by BatchNorm, so the function stays preserved (up to BN's
    epsilon) everywhere except the classifier, whose logits are scaled by the factor of the last
    group, as in the VGG.
    """

    num_classes: int = 10
    widths: tuple = MOBILENET_V1_WIDTHS
    strides: tuple = MOBILENET_V1_STRIDES

    def _layout(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        widths = _check_widths("GrowableMobileNetV1", self.widths)
        strides = tuple(self.strides)
        if len(strides) != len(widths) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in strides):
            raise ValueError(f"GrowableMobileNetV1: strides must be {len(widths)} ints >= 1 (the stem's, "
                             f"then one per block, as many as widths), got {strides}")
        return widths, strides

    def groups(self) -> dict[str, int]:
        widths, _ = self._layout()
        return {"stem": widths[0], **{f"block{i}": w for i, w in enumerate(widths[1:])}}

    def at_widths(self, widths: Mapping[str, int]) -> "GrowableMobileNetV1":
        widths = _widths_for(self.groups(), widths, "GrowableMobileNetV1")
        return self.clone(widths=(int(widths["stem"]),) + tuple(
            int(widths[f"block{i}"]) for i in range(len(self._layout()[0]) - 1)))

    def growth_spec(self) -> tuple[GrowthLayer, ...]:
        layers = [GrowthLayer(("stem",), None, "stem", ("stem_bn",))]
        prev = "stem"
        for i in range(len(self._layout()[0]) - 1):
            blk, g = f"b{i}", f"block{i}"
            layers += [GrowthLayer((blk, "dw"), prev, prev, (blk, "dw_bn"), depthwise=True),
                       GrowthLayer((blk, "pw"), prev, g, (blk, "pw_bn"))]
            prev = g
        layers.append(GrowthLayer(("fc",), prev, None, None))
        return tuple(layers)

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "GrowableMobileNetV1")
        widths, strides = self._layout()
        x = init.conv(widths[0], 3, strides[0], name="stem")(x)
        x = nn.relu(init.batch_norm_masked(x, train, mask, name="stem_bn"))
        for i, (features, stride) in enumerate(zip(widths[1:], strides[1:])):
            x = _SeparableBlock(features, stride, name=f"b{i}")(x, train, mask)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=init.kaiming_normal, name="fc")(x)


__all__ = ["GrowableMobileNetV1", "GrowableResNet", "GrowableVGG", "GrowthLayer", "MOBILENET_V1_STRIDES",
           "MOBILENET_V1_WIDTHS", "mobilenet_v1_widths"]
