"""The per-step context a transform sees: a small pytree of *traced* values.

Everything that changes during training (temperature, noise key, train flag, step) travels here as
data, so a jitted step never closes over it and a new value never recompiles.
"""
from __future__ import annotations

import math
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

        ``key`` defaults to ``PRNGKey(0)``; an int is turned into ``PRNGKey(key)``.
        """
        if not isinstance(beta, jax.core.Tracer):
            try:
                values = np.asarray(beta, np.float64)
            except (TypeError, ValueError):
                values = np.asarray(np.nan)
            if not np.all(np.isfinite(values)) or not np.all(values > 0):
                raise ValueError(f"beta must be finite and > 0, got {beta!r}")
        if key is None:
            key = jax.random.PRNGKey(0)
        elif isinstance(key, int):
            key = jax.random.PRNGKey(key)
        return cls(beta=jnp.asarray(beta, jnp.float32), key=jnp.asarray(key),
                   train=jnp.asarray(train, jnp.bool_), step=jnp.asarray(step, jnp.int32))

    def fold(self, index: int) -> "Context":
        """The same context with ``key`` folded with ``index`` (one independent stream per transform)."""
        return self.replace(key=jax.random.fold_in(self.key, index))


def check_finite(name: str, value: Any) -> None:
    """ValueError unless a concrete scalar ``value`` is finite (tracers pass unchecked)."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        ok = all(math.isfinite(float(v)) for v in np.ravel(np.asarray(value, np.float64)))
    except (TypeError, ValueError, jax.errors.TracerArrayConversionError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
