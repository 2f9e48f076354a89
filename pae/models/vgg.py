"""VGG-11/16 for CIFAR: 3x3 conv (with bias) + BN + ReLU stacks, max-pools, one FC layer.

The common CIFAR variant (as in widely used PyTorch CIFAR code): after five pools a 32x32 input is
1x1x512, followed by a single Linear(512, classes). PyTorch default initialization.
VGG-16: 14,728,266 parameters; VGG-11: 9,231,114 (10 classes).
"""
from flax import linen as nn

from pae.models import init

CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG-11/16 for 32x32 inputs (five 2x2 pools); ``mask`` as in :class:`pae.models.CifarResNet`."""

    depth: int = 16
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        if self.depth not in CONFIGS:
            raise ValueError(f"depth must be one of {sorted(CONFIGS)}, got {self.depth}")
        init.check_mask(mask, x, "VGG")
        # five VALID 2x2 pools: a smaller image reaches 0x0 and the mean over it is NaN
        init.check_min_size(x, f"vgg{self.depth}", 32, "32x32 CIFAR images")
        for item in CONFIGS[self.depth]:
            if item == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            fan_in = x.shape[-1] * 9
            x = nn.Conv(item, (3, 3), padding=1, kernel_init=init.torch_default,
                        bias_init=init.torch_default_bias(fan_in))(x)
            x = nn.relu(init.batch_norm_masked(x, train, mask))
        x = x.mean(axis=(1, 2))
        return init.torch_dense(self.num_classes, x.shape[-1])(x)
