"""ResNet-18/50 for ImageNet (He et al., arXiv 1512.03385), laid out as torchvision's.

7x7/2 stem + 3x3/2 max-pool, four stages (64, 128, 256, 512 base widths), basic blocks (18) or
bottlenecks with expansion 4 (50) and stride on the 3x3 conv (v1.5), 1x1 projection + BN shortcuts.
Kaiming-normal fan-out convs, BN gamma=1 beta=0, PyTorch-default FC. 11,689,512 / 25,557,032 parameters.
"""
import functools
from typing import Sequence

from flax import linen as nn

from pae.models import init

_conv = functools.partial(init.conv, kernel_init=init.kaiming_normal_fan_out)

class Basic(nn.Module):
    features: int
    stride: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        y = nn.relu(init.batch_norm_masked(_conv(self.features, 3, self.stride)(x), train, mask))
        y = init.batch_norm_masked(_conv(self.features, 3)(y), train, mask)
        return nn.relu(y + _shortcut(x, self.features, self.stride, train, mask))

class Bottleneck(nn.Module):
    features: int
    stride: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        out = self.features * 4
        y = nn.relu(init.batch_norm_masked(_conv(self.features, 1)(x), train, mask))
        y = nn.relu(init.batch_norm_masked(_conv(self.features, 3, self.stride)(y), train, mask))
        y = init.batch_norm_masked(_conv(out, 1)(y), train, mask)
        return nn.relu(y + _shortcut(x, out, self.stride, train, mask))

def _shortcut(x, features, stride, train, mask=None):
    if stride == 1 and x.shape[-1] == features:
        return x
    x = _conv(features, 1, stride, name="shortcut_conv")(x)
    return init.batch_norm_masked(x, train, mask, name="shortcut_bn")

class ResNet(nn.Module):
    """ResNet-18/34 (basic blocks) or -50/101/152 (bottlenecks); ``mask`` as in :class:`CifarResNet`."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    bottleneck: bool = False
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "ResNet")
        block = Bottleneck if self.bottleneck else Basic
        x = nn.relu(init.batch_norm_masked(_conv(64, 7, 2)(x), train, mask))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.stage_sizes):
            for b in range(blocks):
                x = block(64 * 2 ** stage, 2 if stage > 0 and b == 0 else 1)(x, train, mask)
        x = x.mean(axis=(1, 2))
        return init.torch_dense(self.num_classes, x.shape[-1])(x)
