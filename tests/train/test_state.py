"""init_variables: model.init as one compiled program, equal to op-by-op init, compiled once per
(model, shapes), and op by op for a model that cannot be a static argument."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pae.models import CifarResNet, get_model
from pae.train import state
from pae.train.state import init_variables


class _Listed(nn.Module):
    """A model with a list field: not hashable, so not a static argument of a jitted function."""
    sizes: list

    @nn.compact
    def __call__(self, x, train=False):
        for n in self.sizes:
            x = nn.relu(nn.Dense(n)(x))
        return nn.Dropout(0.5, deterministic=not train)(x)


def _eager(model, x, key):
    return model.init({"params": key, "dropout": key}, x, train=False)


def _assert_equal_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)


def test_jitted_init_equals_op_by_op_init_and_compiles_once_per_model_and_shape(compile_log):
    # counted as compilations, not as jit cache entries: entries of models that other tests made
    # leave the cache when those models are garbage collected
    model = CifarResNet(8, 7, (3, 5, 7))     # a model and shape no other test initializes
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    key, other_key = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
    got, compiled = compile_log.compilations(init_variables, model, x, key)
    assert compiled == 1
    _assert_equal_trees(got, _eager(model, x, key))
    equal, other = CifarResNet(8, 7, (3, 5, 7)), CifarResNet(8, 7, (3, 5, 6))
    _, compiled = compile_log.compilations(init_variables, equal, x, other_key)
    assert compiled == 0
    _, compiled = compile_log.compilations(init_variables, other, x, key)
    assert compiled == 1


def test_an_unhashable_model_initializes_op_by_op(monkeypatch):
    model = _Listed([5, 3])
    with pytest.raises(TypeError):
        hash(model)
    x = jnp.ones((2, 4))
    key = jax.random.PRNGKey(1)

    def jitted(*args):
        raise AssertionError("an unhashable model reached the jitted init")
    monkeypatch.setattr(state, "_jitted_init", jitted)
    _assert_equal_trees(init_variables(model, x, key), _eager(model, x, key))


def test_inputs_that_do_not_fit_are_a_value_error_naming_the_shape():
    with pytest.raises(ValueError, match=r"LeNet5 cannot take inputs of shape \(1, 8, 8, 1\)"):
        init_variables(get_model("lenet5", 10), jnp.ones((1, 8, 8, 1)), jax.random.PRNGKey(0))
