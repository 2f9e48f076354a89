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
    depth: int = 16
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in CONFIGS:
            raise ValueError(f"depth must be one of {sorted(CONFIGS)}, got {self.depth}")
        for item in CONFIGS[self.depth]:
            if item == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            fan_in = x.shape[-1] * 9
            x = nn.Conv(item, (3, 3), padding=1, kernel_init=init.torch_default,
                        bias_init=init.torch_default_bias(fan_in))(x)
            x = nn.relu(init.batch_norm(train)(x))
        x = x.mean(axis=(1, 2))
        return init.torch_dense(self.num_classes, x.shape[-1])(x)
