"""CIFAR ResNet-20/32/56 exactly as in the Continuous Sparsification code (lolemacs/continuous-sparsification).

3->16 stem conv, three stages of n = (depth - 2) / 6 basic blocks (16/32/64 channels), global average
pool, FC. Where the shape changes the shortcut is a 1x1 stride-2 conv *without* BN. Convs have no
bias. Xavier-normal (untruncated) conv and FC weights, FC bias 0, BN gamma=1, beta=0.
ResNet-20: 272,282 parameters (267,696 in 3x3 convs, 2,560 shortcut, 650 FC, 1,376 BN).
"""
import functools

from flax import linen as nn

from pae.models import init

_conv = functools.partial(init.conv, kernel_init=init.xavier_normal)

class BasicBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        y = nn.relu(init.batch_norm_masked(_conv(self.features, 3, self.stride)(x), train, mask))
        y = init.batch_norm_masked(_conv(self.features, 3)(y), train, mask)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, name="shortcut")(x)
        return nn.relu(x + y)

class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (20, 32, 44, 56, 110).

    ``mask`` (``[B]``, 1 real / 0 padding, default all real) keeps padding rows out of the
    BatchNorm statistics in training (:func:`pae.models.init.batch_norm_masked`).
    """

    depth: int = 20
    num_classes: int = 10
    widths: tuple[int, int, int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "CifarResNet")
        if (self.depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (20, 32, 56, ...), got {self.depth}")
        blocks = (self.depth - 2) // 6
        x = nn.relu(init.batch_norm_masked(_conv(self.widths[0], 3)(x), train, mask))
        for stage, features in enumerate(self.widths):
            for b in range(blocks):
                x = BasicBlock(features, 2 if stage > 0 and b == 0 else 1)(x, train, mask)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=init.xavier_normal)(x)
