"""A tiny conv net with BatchNorm on 320 digits: small enough for whole searches in a test."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pae.data import load_dataset
from pae.train import Task, data_mesh


class TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


@pytest.fixture(scope="module")
def task():
    ds = load_dataset("digits")
    tf = ds.transform(False)
    train, test = ds["train"].subset(np.arange(320)), ds["test"].subset(np.arange(160))
    example = jnp.asarray(tf(train.take(np.array([0])), None)["inputs"])
    return Task(TinyBN(), train, {"test": test}, ds.transform(True), tf, example, data_mesh())
