"""The lottery-ticket papers' small networks: LeNet-300-100, LeNet-5 and Conv-2/4/6.

Frankle & Carbin (arXiv 1803.03635), Table 1: LeNet-300-100 has 266,610 weights on MNIST; Conv-2/4
have 4.3M / 2.4M on CIFAR-10, which these layouts reproduce (4,301,642 / 2,425,930). Table 1's 1.7M
for Conv-6 cannot come from its stated layers (its first FC layer alone has 4*4*256*256 weights);
the layout here gives 2,262,602. Initialization is PyTorch's default (as in the open_lth-style
PyTorch code these experiments follow); pass other initializers through the fields.

None of them has BatchNorm: ``mask`` is accepted (one call signature for every model) and ignored.
"""
from typing import Sequence

from flax import linen as nn

from pae.models import init


#: LeNet-5's smallest input: 12 -> conv(pad 2) 12 -> pool 6 -> conv 2 -> pool 1.
LENET5_MIN_SIZE = 12


class MLP(nn.Module):
    """Fully connected ReLU network; ``MLP((300, 100))`` is LeNet-300-100. Inputs are flattened."""

    hidden: Sequence[int] = (300, 100)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        del train, mask
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(init.torch_dense(width, x.shape[-1])(x))
        return init.torch_dense(self.num_classes, x.shape[-1])(x)


class LeNet5(nn.Module):
    """LeNet-5: conv6 5x5 (pad 2) - pool - conv16 5x5 - pool - 120 - 84 - classes (61,706 on MNIST).

    Inputs must be at least 12x12: the unpadded second conv and two 2x2 pools leave nothing of a
    smaller image (28x28 MNIST gives 5x5x16). The layout is kept as published rather than adapted
    to small images, so a smaller input (e.g. the 8x8 ``digits``) raises a ValueError that names
    the size needed; use ``lenet300_100`` or ``conv2`` there.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        del train, mask
        init.check_min_size(x, "lenet5", LENET5_MIN_SIZE, "28x28 MNIST digits")
        for features, padding in ((6, 2), (16, 0)):
            fan_in = x.shape[-1] * 25
            x = nn.Conv(features, (5, 5), padding=padding, kernel_init=init.torch_default,
                        bias_init=init.torch_default_bias(fan_in))(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        for width in (120, 84):
            x = nn.relu(init.torch_dense(width, x.shape[-1])(x))
        return init.torch_dense(self.num_classes, x.shape[-1])(x)


class ConvNet(nn.Module):
    """Conv-2/4/6: pairs of 3x3 convs (64, 128, 256) each followed by 2x2 max-pool, then FC 256-256.

    Inputs must be at least ``2 ** len(stages)`` pixels high and wide (one 2x2 pool per stage).
    """

    stages: Sequence[int] = (64,)
    fc: Sequence[int] = (256, 256)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        del train, mask
        init.check_min_size(x, f"conv{2 * len(self.stages)}", 2 ** len(self.stages),
                            "32x32 CIFAR images")
        for features in self.stages:
            for _ in range(2):
                fan_in = x.shape[-1] * 9
                x = nn.relu(nn.Conv(features, (3, 3), kernel_init=init.torch_default,
                                    bias_init=init.torch_default_bias(fan_in))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        for width in self.fc:
            x = nn.relu(init.torch_dense(width, x.shape[-1])(x))
        return init.torch_dense(self.num_classes, x.shape[-1])(x)
