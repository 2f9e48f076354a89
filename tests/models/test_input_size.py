"""Models that need a minimum image size say so with a ValueError (issue 11, item 10)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pae.data import load_dataset
from pae.models import get_model


def _init(name, shape):
    model = get_model(name, 10)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def test_lenet5_on_8x8_digits_names_the_input_size_it_needs():
    x = load_dataset("digits").example_inputs()  # the case: 8x8 digits
    assert x.shape[1:3] == (8, 8)
    with pytest.raises(ValueError) as info:
        _init("lenet5", x.shape)
    message = str(info.value)
    assert "lenet5 needs images of at least 12x12 pixels" in message
    assert "got 8x8" in message
    assert "lenet300_100" in message  # says what to use instead


# (model, smallest size that works): LeNet-5 12 -> 12 -> 6 -> 2 -> 1; Conv-2k: one pool per stage;
# VGG: five pools.
MIN_SIZES = [("lenet5", 12, 1), ("conv2", 2, 3), ("conv4", 4, 3), ("conv6", 8, 3), ("vgg11", 32, 3)]


@pytest.mark.parametrize("name,size,channels", MIN_SIZES)
def test_minimum_input_size_is_exact(name, size, channels):
    variables = _init(name, (2, size, size, channels))  # the smallest size works
    assert "params" in variables
    with pytest.raises(ValueError, match=f"{name} needs images of at least {size}x{size}"):
        _init(name, (2, size - 1, size, channels))  # one pixel less in either dimension fails
    with pytest.raises(ValueError, match=f"got {size}x{size - 1}"):
        _init(name, (2, size, size - 1, channels))


def test_non_image_input_to_an_image_model_is_a_value_error():
    with pytest.raises(ValueError, match="NHWC"):
        _init("lenet5", (2, 28, 28))
