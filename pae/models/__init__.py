"""Flax models used by the experiments, by name: ``get_model("resnet20", num_classes=10)``.

Every model is called as ``model.apply(variables, inputs, train=..., mask=...)``; image models take
NHWC float inputs, text models int tokens ``[B, T]``. ``mask`` (optional, ``[B]``, 1 for a real
example and 0 for a padding row, as ``batch["mask"]`` from :func:`pae.data.iterate_batches`; default
None = all real) keeps padding rows out of BatchNorm's batch statistics and running averages in
training; models without BatchNorm accept and ignore it.
"""
import re
from typing import Callable

from flax import linen as nn

from pae.models import init
from pae.models.mobilenet import MobileNetV1
from pae.models.resnet_cifar import CifarResNet
from pae.models.resnet_imagenet import ResNet
from pae.models.small import MLP, ConvNet, LeNet5
from pae.models.text import CharLSTM, TransformerLM
from pae.models.vgg import VGG
from pae.models.wrn import WideResNet

_IMAGE: dict[str, Callable[..., nn.Module]] = {
    "lenet300_100": lambda n, **kw: MLP((300, 100), n, **kw),
    "lenet5": lambda n, **kw: LeNet5(n, **kw),
    "conv2": lambda n, **kw: ConvNet((64,), num_classes=n, **kw),
    "conv4": lambda n, **kw: ConvNet((64, 128), num_classes=n, **kw),
    "conv6": lambda n, **kw: ConvNet((64, 128, 256), num_classes=n, **kw),
    "resnet20": lambda n, **kw: CifarResNet(20, n, **kw),
    "resnet32": lambda n, **kw: CifarResNet(32, n, **kw),
    "resnet56": lambda n, **kw: CifarResNet(56, n, **kw),
    "vgg11": lambda n, **kw: VGG(11, n, **kw),
    "vgg16": lambda n, **kw: VGG(16, n, **kw),
    "resnet18": lambda n, **kw: ResNet((2, 2, 2, 2), False, n, **kw),
    "resnet50": lambda n, **kw: ResNet((3, 4, 6, 3), True, n, **kw),
    "mobilenet_v1": lambda n, **kw: MobileNetV1(n, **kw),
}
_TEXT: dict[str, Callable[..., nn.Module]] = {
    "char_lstm": lambda n, **kw: CharLSTM(n, **kw),
    "transformer_lm": lambda n, **kw: TransformerLM(n, **kw),
}
_WRN = re.compile(r"wrn(\d+)_(\d+)$")
NAMES = tuple(_IMAGE) + ("wrn<depth>_<k> (e.g. wrn28_10)",) + tuple(_TEXT)


def model_kind(name: str) -> str:
    """``"image"`` or ``"text"``: which kind of data set the named model consumes."""
    if name in _TEXT:
        return "text"
    if name in _IMAGE or _WRN.match(name):
        return "image"
    raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMES)}")


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a model by name; ``num_classes`` is the vocabulary size for text models.

    Extra keyword arguments go to the module (e.g. ``dropout=0.3`` for WRN, ``hidden=512`` for LSTM).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model_kind(name)
    if match := _WRN.match(name):
        return WideResNet(int(match[1]), int(match[2]), num_classes, **kwargs)
    return {**_IMAGE, **_TEXT}[name](num_classes, **kwargs)


__all__ = ["CharLSTM", "CifarResNet", "ConvNet", "LeNet5", "MLP", "MobileNetV1", "NAMES", "ResNet",
           "TransformerLM", "VGG", "WideResNet", "get_model", "init", "model_kind"]
