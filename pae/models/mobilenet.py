"""MobileNetV1 (Howard et al., arXiv 1704.04861): a 3x3/2 conv then 13 depthwise-separable blocks.

Width multiplier ``alpha``; each block is depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU.
Kaiming-normal fan-out convs, PyTorch-default classifier. alpha=1, 1000 classes: 4,231,976 parameters.
"""
from flax import linen as nn

from pae.models import init

BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    """MobileNetV1; ``mask`` as in :class:`pae.models.CifarResNet`."""

    num_classes: int = 1000
    alpha: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        init.check_mask(mask, x, "MobileNetV1")
        width = lambda c: max(8, int(c * self.alpha))
        x = nn.Conv(width(32), (3, 3), (2, 2), padding=1, use_bias=False,
                    kernel_init=init.kaiming_normal_fan_out)(x)
        x = nn.relu(init.batch_norm_masked(x, train, mask))
        for features, stride in BLOCKS:
            channels = x.shape[-1]
            x = nn.Conv(channels, (3, 3), (stride, stride), padding=1, use_bias=False,
                        feature_group_count=channels, kernel_init=init.kaiming_normal_fan_out)(x)
            x = nn.relu(init.batch_norm_masked(x, train, mask))
            x = nn.Conv(width(features), (1, 1), use_bias=False,
                        kernel_init=init.kaiming_normal_fan_out)(x)
            x = nn.relu(init.batch_norm_masked(x, train, mask))
        x = x.mean(axis=(1, 2))
        return init.torch_dense(self.num_classes, x.shape[-1])(x)
