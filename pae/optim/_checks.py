"""Hyperparameter validation for the optimizer factories.

Checks run when an optimizer is *constructed*, on concrete values only. A traced value (the factory
is re-called inside ``jit`` by ``optax.inject_hyperparams``) or a learning-rate schedule (a
callable) is passed through unchecked, so validation never puts Python control flow on a traced
array; a schedule for any other hyperparameter is a TypeError naming it.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "concrete_float",
    "check_nonnegative",
    "check_positive",
    "check_unit_interval",
    "check_choice",
]


def concrete_float(value: Any, fn: str = "", name: str = "value", *, schedule_ok: bool = False
                   ) -> float | None:
    """The value as a Python float, or None when it is a traced array (or, with ``schedule_ok``, a
    schedule).

    A schedule where none is taken (only learning rates take one here), a non-number or an array of
    more than one value raises, naming ``fn`` and ``name``.
    """
    where = f"{fn}: {name}" if fn else name
    if isinstance(value, jax.core.Tracer):
        return None
    if callable(value):
        if schedule_ok:
            return None
        raise TypeError(f"{where} must be a number, got a schedule {value!r}; only learning_rate takes "
                        "one (schedule other hyperparameters with optax.inject_hyperparams)")
    array = np.asarray(value)
    if not (array.dtype == bool or jnp.issubdtype(array.dtype, jnp.number)):   # (bf16 too)
        raise TypeError(f"{where} must be a number, got {value!r}")
    if array.ndim != 0:
        raise ValueError(f"{where} must be a scalar, got an array of shape {array.shape}")
    return float(array)


def _fail(fn: str, name: str, value: Any, allowed: str) -> ValueError:
    hint = ""
    if str(getattr(value, "dtype", "")) in ("bfloat16", "float16"):    # e.g. b2 = 0.999 -> 1.0
        hint = (f" (rounded in {value.dtype}: under optax.inject_hyperparams pass "
                "hyperparam_dtype=jnp.float32)")
    return ValueError(f"{fn}: {name} must be {allowed}, got {name}={value!r}{hint}")


def check_nonnegative(fn: str, name: str, value: Any, *, schedule_ok: bool = False) -> None:
    """ValueError unless ``value`` is finite and >= 0 (tracers pass; schedules if ``schedule_ok``)."""
    x = concrete_float(value, fn, name, schedule_ok=schedule_ok)
    if x is not None and not (math.isfinite(x) and x >= 0.0):
        raise _fail(fn, name, value, "a finite number >= 0")


def check_positive(fn: str, name: str, value: Any, *, schedule_ok: bool = False) -> None:
    """ValueError unless ``value`` is finite and > 0 (tracers pass; schedules if ``schedule_ok``)."""
    x = concrete_float(value, fn, name, schedule_ok=schedule_ok)
    if x is not None and not (math.isfinite(x) and x > 0.0):
        raise _fail(fn, name, value, "a finite number > 0")


def check_unit_interval(fn: str, name: str, value: Any, *, schedule_ok: bool = False) -> None:
    """ValueError unless ``0 <= value < 1`` (tracers pass; schedules if ``schedule_ok``)."""
    x = concrete_float(value, fn, name, schedule_ok=schedule_ok)
    if x is not None and not (0.0 <= x < 1.0):
        raise _fail(fn, name, value, "in [0, 1)")


def check_choice(fn: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise _fail(fn, name, value, "one of " + ", ".join(repr(c) for c in choices))
