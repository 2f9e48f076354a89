"""The per-step context a transform sees: a small pytree of *traced* values.

Everything that changes during training (temperature, noise key, train flag, step) travels here as
data, so a jitted step never closes over it and a new value never recompiles.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Context:
    """``beta`` inverse temperature (float32), ``key`` raw PRNG key (uint32[2]), ``train`` bool,
    ``step`` int32. Build one with :meth:`Context.make`."""

    beta: jax.Array
    key: jax.Array
    train: jax.Array
    step: jax.Array

    @classmethod
    def make(cls, beta: Any = 1.0, key: Any = None, train: Any = True, step: Any = 0) -> "Context":
        """A context from Python or array values; ``beta`` must be finite and > 0 (checked when concrete).

        ``key`` defaults to ``PRNGKey(0)``; an int (or int array, traced too) is turned into
        ``PRNGKey(key)``; a typed key (``jax.random.key``) is stored as its raw ``uint32`` data.
        """
        check_positive("beta", beta)
        if key is None:
            key = jax.random.PRNGKey(0)
        elif jax.dtypes.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        elif jnp.ndim(key) == 0 and jnp.issubdtype(jnp.result_type(key), jnp.integer):
            key = jax.random.PRNGKey(key)
        return cls(beta=jnp.asarray(beta, jnp.float32), key=jnp.asarray(key),
                   train=jnp.asarray(train, jnp.bool_), step=jnp.asarray(step, jnp.int32))

    def fold(self, index: int) -> "Context":
        """The same context with ``key`` folded with ``index`` (one independent stream per transform)."""
        return self.replace(key=jax.random.fold_in(self.key, index))


def _concrete_values(value: Any) -> np.ndarray | None:
    """float64 values of a concrete number or array; None for tracers; NaN for non-numbers."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (str, bytes)):
        return np.asarray(np.nan)
    try:
        return np.asarray(value, np.float64)
    except (TypeError, ValueError, jax.errors.TracerArrayConversionError):
        return np.asarray(np.nan)


def check_finite(name: str, value: Any) -> None:
    """ValueError unless a concrete ``value`` is a finite number (tracers pass unchecked)."""
    values = _concrete_values(value)
    if values is not None and not all(math.isfinite(v) for v in np.ravel(values)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_min_int(name: str, value: Any, low: int) -> int:
    """``int(value)``; ValueError naming ``name`` unless ``value`` is an integral, non-bool number
    ``>= low`` (a float is refused, never truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_positive(name: str, value: Any) -> None:
    """ValueError unless a concrete ``value`` is finite and > 0 (tracers pass unchecked)."""
    values = _concrete_values(value)
    if values is not None and not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
