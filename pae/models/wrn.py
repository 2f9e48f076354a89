"""Pre-activation wide ResNet WRN-d-k (Zagoruyko & Komodakis, arXiv 1605.07146).

Stem 3x3 conv (16), three groups of n = (d - 4) / 6 pre-activation blocks of width 16k, 32k, 64k
(BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3), a 1x1 conv shortcut where the shape changes, final
BN-ReLU, average pool, FC. Initialization as in the soft-sharing code (lolemacs/soft-sharing):
kaiming-normal (fan-in, untruncated) convs and FC, FC bias 0. WRN-28-10 on 10 classes: 36,479,194.
"""
import functools

from flax import linen as nn

from pae.models import init

_conv = functools.partial(init.conv, kernel_init=init.kaiming_normal)

class WideBlock(nn.Module):
    features: int
    stride: int = 1
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        o = nn.relu(init.batch_norm_masked(x, train, mask))
        y = _conv(self.features, 3, self.stride)(o)
        y = nn.relu(init.batch_norm_masked(y, train, mask))
        if self.dropout:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = _conv(self.features, 3)(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, name="shortcut")(o)
        return x + y

class WideResNet(nn.Module):
    """WRN-depth-widen; ``mask`` as in :class:`pae.models.CifarResNet`."""

    depth: int = 28
    widen: int = 10
    num_classes: int = 10
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "WideResNet")
        if (self.depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 (16, 22, 28, 40, ...), got {self.depth}")
        blocks = (self.depth - 4) // 6
        x = _conv(16, 3)(x)
        for stage, base in enumerate((16, 32, 64)):
            for b in range(blocks):
                x = WideBlock(base * self.widen, 2 if stage > 0 and b == 0 else 1,
                              self.dropout)(x, train, mask)
        x = nn.relu(init.batch_norm_masked(x, train, mask)).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=init.kaiming_normal)(x)
