"""Hyperparameter validation for the optimizer factories.

Checks run when an optimizer is *constructed*, on concrete values only. A traced value (the factory
is re-called inside ``jit`` by ``optax.inject_hyperparams``) or a schedule (a callable) is passed
through unchecked, so validation never puts Python control flow on a traced array.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

__all__ = [
    "concrete_float",
    "check_nonnegative",
    "check_positive",
    "check_unit_interval",
    "check_choice",
]


def concrete_float(value: Any) -> float | None:
    """The value as a Python float, or None when it is a schedule or a traced array.

    Raises ValueError for non-scalar arrays (a hyperparameter is one number).
    """
    if callable(value) or isinstance(value, jax.core.Tracer):
        return None
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(f"hyperparameters must be scalars, got an array of shape {array.shape}")
    return float(array)


def _fail(fn: str, name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{fn}: {name} must be {allowed}, got {name}={value!r}")


def check_nonnegative(fn: str, name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is finite and >= 0 (schedules and tracers pass)."""
    x = concrete_float(value)
    if x is not None and not (math.isfinite(x) and x >= 0.0):
        raise _fail(fn, name, value, "a finite number >= 0")


def check_positive(fn: str, name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is finite and > 0 (schedules and tracers pass)."""
    x = concrete_float(value)
    if x is not None and not (math.isfinite(x) and x > 0.0):
        raise _fail(fn, name, value, "a finite number > 0")


def check_unit_interval(fn: str, name: str, value: Any) -> None:
    """Raise ValueError unless ``0 <= value < 1`` (schedules and tracers pass)."""
    x = concrete_float(value)
    if x is not None and not (0.0 <= x < 1.0):
        raise _fail(fn, name, value, "in [0, 1)")


def check_choice(fn: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise _fail(fn, name, value, "one of " + ", ".join(repr(c) for c in choices))
