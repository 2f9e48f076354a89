"""Initializers that match PyTorch's, so models reproduce the official code of each paper.

JAX's ``glorot_normal``/``he_normal`` are *truncated* normals; PyTorch's ``xavier_normal_`` and
``kaiming_normal_`` are not. Flax kernels are HWIO / (in, out), PyTorch's OIHW / (out, in); the fans
computed by ``variance_scaling`` (receptive field x channels) are the same for both layouts.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn

#: ``nn.init.xavier_normal_``: N(0, 2 / (fan_in + fan_out)), untruncated (Continuous Sparsification code).
xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
#: ``nn.init.kaiming_normal_(mode="fan_in", nonlinearity="relu")``: N(0, 2 / fan_in), untruncated.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
#: ``kaiming_normal_(mode="fan_out")`` as torchvision's ResNets use it.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
#: PyTorch's default ``nn.Linear``/``nn.Conv2d`` weight: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
    """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); needs the layer's fan-in."""
    bound = 1.0 / jnp.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
    """``nn.Linear`` with PyTorch's default initialization."""
    return nn.Dense(features, kernel_init=torch_default, bias_init=torch_default_bias(fan_in),
                    name=name)


def batch_norm(train: bool, name: str | None = None, scale_init=nn.initializers.ones) -> nn.BatchNorm:
    """PyTorch-equivalent BatchNorm: momentum 0.1 there is 0.9 here; eps 1e-5; gamma=1, beta=0."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        scale_init=scale_init, name=name)


def check_mask(mask, x, model: str) -> None:
    """Raise ValueError unless ``mask`` is None or a ``[B]`` vector for a batch ``x`` of ``B`` rows.

    ``mask`` is the pipeline's ``batch["mask"]``: 1 for a real example, 0 for a padding row.
    """
    if mask is None:
        return
    shape = tuple(getattr(mask, "shape", ()))
    if shape != (x.shape[0],):
        raise ValueError(f"{model}: mask must have shape [batch] = ({x.shape[0]},) (1 for a real "
                         f"example, 0 for padding), got mask of shape {shape}")


def batch_norm_masked(x, train: bool, mask=None, *, name: str | None = None,
                      scale_init=nn.initializers.ones):
    """:func:`batch_norm` applied to ``x`` with padding rows left out of the batch statistics.

    In training the mean and variance are taken over the rows with ``mask != 0`` only (over all
    rows when ``mask`` is None), so padding rows change neither the normalization of the real rows
    nor the running averages; padding rows are normalized with the real rows' statistics. The
    per-example ``[B]`` mask is broadcast to ``x.shape`` for ``nn.BatchNorm(...)(x, mask=...)``.
    At least one row must be real. In evaluation (running averages) ``mask`` has no effect.
    """
    module = batch_norm(train, name=name, scale_init=scale_init)
    if not train or mask is None:
        return module(x)
    real = jnp.asarray(mask) != 0
    real = jnp.broadcast_to(real.reshape(real.shape + (1,) * (x.ndim - 1)), x.shape)
    return module(x, mask=real)


def check_min_size(x, model: str, min_size: int, designed_for: str) -> None:
    """Raise ValueError unless ``x`` is an NHWC batch whose height and width are >= ``min_size``."""
    if x.ndim != 4:
        raise ValueError(f"{model}: inputs must be NHWC images [batch, height, width, channels], "
                         f"got inputs of shape {tuple(x.shape)}")
    height, width = x.shape[1:3]
    if min(height, width) < min_size:
        raise ValueError(
            f"{model} needs images of at least {min_size}x{min_size} pixels (it was designed for "
            f"{designed_for}), got {height}x{width} (inputs of shape {tuple(x.shape)}); use a data "
            f"set with larger images (e.g. mnist_subset) or a model that takes small ones "
            f"(e.g. lenet300_100, conv2, resnet20)")


def conv(features: int, kernel: int, stride: int = 1, *, kernel_init=kaiming_normal,
         name: str | None = None) -> nn.Conv:
    """A bias-free ``kernel x kernel`` conv with PyTorch's symmetric ``padding=kernel // 2``."""
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=kernel // 2,
                   use_bias=False, kernel_init=kernel_init, name=name)
