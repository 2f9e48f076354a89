"""Weight decay without ``params``: a clear ValueError from every optimizer (issue 11, item 5).

optax 0.2.8 has no ``optax.NO_PARAMS_MSG``; the old code raised ``AttributeError`` while building the
message. The message is pae's own now, so it is the same with every optax version.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pae.optim as po
from pae.optim import _common

FACTORIES = [po.avagrad, po.avagradw, po.adabound, po.amsbound, po.adaboundw, po.csgd]


def _params():
    return {"w": jnp.arange(6.0).reshape(2, 3) / 7.0, "b": jnp.array([0.5, -1.5])}


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_decay_without_params_raises_value_error_naming_optimizer(factory):
    tx = factory(weight_decay=1e-2)
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    with pytest.raises(ValueError) as info:
        tx.update(grads, state)  # no params
    message = str(info.value)
    assert factory.__name__ + ":" in message  # names the optimizer
    assert "weight_decay=0.01" in message  # names the argument and its value
    assert "params" in message  # says what is missing and how to fix it
    # AvaGradW skips the decay on step 1 but still needs params from the first call (traced once).
    with pytest.raises(ValueError, match="weight_decay"):
        jax.jit(lambda g, s: tx.update(g, s))(grads, state)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("zero", [0, 0.0, np.float32(0.0), jnp.zeros([])],
                         ids=["int", "float", "np.float32", "jax"])
def test_zero_decay_needs_no_params_and_matches_the_update_with_params(factory, zero):
    tx = factory(weight_decay=zero)
    params = _params()
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.25, params)
    state = tx.init(params)
    _, state = tx.update(grads, state)  # step 2 (AvaGrad's first update is 0 by design)
    without, _ = tx.update(grads, state)
    with_params, _ = tx.update(grads, state, params)
    for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(with_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.all(np.isfinite(np.asarray(a))) and np.any(np.asarray(a) != 0)


def test_decay_with_params_is_added_to_the_updates():
    """The decay term itself, against NumPy: u = g + wd * p (before CSGD's EMA; momentum 0)."""
    params = _params()
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    tx = po.csgd(learning_rate=1.0, momentum=0.0, weight_decay=0.3)
    updates, _ = tx.update(grads, tx.init(params), params)
    for u, g, p in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(u), -(np.cos(np.asarray(p)) + 0.3 * np.asarray(p)),
                                   rtol=1e-6)


def test_injected_decay_without_params():
    """inject_hyperparams: a concrete 0 needs no params; a traced one (under jit) must have them."""
    tx = optax.inject_hyperparams(po.avagrad)(learning_rate=0.1, weight_decay=0.0)
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx.update(grads, tx.init(params))  # concrete 0 outside jit: fine
    with pytest.raises(ValueError, match="avagrad: weight_decay=a traced value"):
        jax.jit(tx.update)(grads, tx.init(params))
    tx = optax.inject_hyperparams(po.csgd)(learning_rate=0.1, weight_decay=1e-3)
    with pytest.raises(ValueError, match="csgd: weight_decay=.*0.001"):
        tx.update(grads, tx.init(params))


def test_message_does_not_depend_on_optax_constants(monkeypatch):
    """Newer and older optax alike: the message is built without any optax attribute."""
    monkeypatch.delattr(optax, "NO_PARAMS_MSG", raising=False)
    error = _common.missing_params_error("csgd", 5e-4)
    assert isinstance(error, ValueError)
    assert str(error).startswith("csgd: weight_decay=0.0005 needs the current parameters")
