"""Bad hyperparameters raise a clear ValueError at construction, never inside traced code."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pae.optim as po

BAD = [
    # (factory, argument, bad value, phrase of what is allowed)
    (po.avagrad, "learning_rate", -0.1, ">= 0"),
    (po.avagrad, "eps", -1e-3, "> 0"),
    (po.avagrad, "eps", 0.0, "> 0"),
    (po.avagrad, "weight_decay", -5e-4, ">= 0"),
    (po.avagrad, "b1", 1.0, "in [0, 1)"),
    (po.avagrad, "b2", -0.1, "in [0, 1)"),
    (po.avagrad, "form", "pytorch", "one of 'official', 'paper'"),
    (po.avagradw, "weight_decay", -1.0, ">= 0"),
    (po.avagradw, "b2", 1.5, "in [0, 1)"),
    (po.scale_by_avagrad, "b1", float("nan"), "in [0, 1)"),
    (po.adabound, "learning_rate", -1e-3, ">= 0"),
    (po.adabound, "final_lr", -0.1, ">= 0"),
    (po.adabound, "gamma", 1.0, "in [0, 1)"),
    (po.adabound, "gamma", -1e-3, "in [0, 1)"),
    (po.adabound, "eps", -1e-8, ">= 0"),
    (po.adabound, "weight_decay", -1e-4, ">= 0"),
    (po.adabound, "b1", 1.0, "in [0, 1)"),
    (po.adabound, "reference_lr", 0.0, "> 0"),
    (po.amsbound, "b2", 1.0, "in [0, 1)"),
    (po.adaboundw, "weight_decay", -1e-4, ">= 0"),
    (po.adaboundw, "final_lr", float("inf"), ">= 0"),
    (po.scale_by_adabound, "gamma", 2.0, "in [0, 1)"),
    (po.csgd, "learning_rate", -0.1, ">= 0"),
    (po.csgd, "momentum", -0.9, "in [0, 1)"),
    (po.csgd, "momentum", 1.0, "in [0, 1)"),
    (po.csgd, "weight_decay", -5e-4, ">= 0"),
]


@pytest.mark.parametrize("factory,arg,value,allowed", BAD,
                         ids=[f"{f.__name__}-{a}-{v}" for f, a, v, _ in BAD])
def test_bad_hyperparameter_raises_value_error_naming_it(factory, arg, value, allowed):
    with pytest.raises(ValueError) as info:
        factory(**{arg: value})
    message = str(info.value)
    assert factory.__name__ in message
    assert f"{arg}={value!r}" in message  # names the argument and the bad value
    assert allowed in message  # says what is allowed


@pytest.mark.parametrize("factory", [po.avagrad, po.adabound, po.csgd])
def test_numpy_and_jax_scalars_are_validated_too(factory):
    with pytest.raises(ValueError, match="learning_rate"):
        factory(learning_rate=np.float32(-1.0))
    with pytest.raises(ValueError, match="learning_rate"):
        factory(learning_rate=jnp.asarray(-1.0))
    with pytest.raises(ValueError, match=": learning_rate must be a scalar, got an array of shape"):
        factory(learning_rate=jnp.ones(2))


@pytest.mark.parametrize("factory,name", [(po.avagrad, "eps"), (po.avagrad, "b1"), (po.adabound, "final_lr"),
                                          (po.adabound, "gamma"), (po.avagradw, "weight_decay"),
                                          (po.csgd, "momentum")])
def test_only_the_learning_rate_takes_a_schedule_and_every_value_is_a_number(factory, name):
    """A schedule, a string or None for another hyperparameter is a TypeError naming it at
    construction (it used to build and fail inside update with an unrelated message)."""
    fn = factory.__name__
    with pytest.raises(TypeError, match=f"{fn}: {name} must be a number, got a schedule"):
        factory(**{name: optax.constant_schedule(0.1)})
    for bad in ("0.1", None):
        with pytest.raises(TypeError, match=f"{fn}: {name} must be a number, got {bad!r}"):
            factory(**{name: bad})


def test_boundary_values_are_accepted():
    po.avagrad(learning_rate=0.0, b1=0.0, b2=0.0, weight_decay=0.0)
    po.adabound(learning_rate=0.0, final_lr=0.0, b1=0.0, b2=0.0, gamma=0.0, eps=0.0)
    po.csgd(learning_rate=0.0, momentum=0.0)


def test_schedule_with_zero_initial_lr_needs_reference_lr():
    warmup = optax.linear_schedule(0.0, 1e-3, 100)
    with pytest.raises(ValueError, match=re.escape("reference_lr")):
        po.adabound(warmup)
    tx = po.adabound(warmup, reference_lr=1e-3)  # fine with an explicit reference
    params = jnp.ones(3)
    updates, _ = tx.update(jnp.ones(3), tx.init(params), params)
    np.testing.assert_array_equal(updates, 0.0)  # lr(0) = 0: no movement, no NaN


def test_validation_is_skipped_for_traced_values():
    """inject_hyperparams re-calls the factory with tracers inside jit: no concrete checks there."""
    for factory, kw in [(po.avagrad, dict(learning_rate=0.1)), (po.adabound, dict(learning_rate=1e-3)),
                        (po.csgd, dict(learning_rate=0.1, momentum=0.9))]:
        tx = optax.inject_hyperparams(factory)(**kw)
        params = jnp.ones(3)
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(jnp.ones(3), state, params)
        assert updates.shape == (3,)

    @jax.jit
    def build_and_step(lr):
        tx = po.avagrad(learning_rate=lr, eps=0.1)
        params = jnp.ones(3)
        return tx.update(jnp.ones(3), tx.init(params), params)[0]

    build_and_step(jnp.float32(0.1))


def test_schedules_are_not_evaluated_by_validation():
    calls = []

    def schedule(count):
        calls.append(count)
        return 0.1 * jnp.ones([])

    po.avagrad(schedule)
    po.csgd(schedule)
    assert calls == []


def test_half_precision_hyperparameters_are_numbers_and_a_rounded_b2_says_why():
    """inject_hyperparams casts hyperparameters to the params' dtype: bf16 lr is accepted, while
    b2 = 0.999 rounds to 1 in bf16 and the error says how to keep float32."""
    po.avagrad(learning_rate=jnp.asarray(0.1, jnp.bfloat16))
    tx = optax.inject_hyperparams(po.avagrad)(learning_rate=0.1)
    with pytest.raises(ValueError, match=r"avagrad: b2 must be in \[0, 1\).*hyperparam_dtype=jnp.float32"):
        tx.init(jnp.zeros(3, jnp.bfloat16))
    tx = optax.inject_hyperparams(po.avagrad, hyperparam_dtype=jnp.float32)(learning_rate=0.1)
    tx.init(jnp.zeros(3, jnp.bfloat16))
