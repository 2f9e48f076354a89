"""Small building blocks shared by the optimizers: weight-decay transforms and scalar helpers."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "add_decayed_weights",
    "missing_params_error",
    "DecayAfterFirstStepState",
    "scalar_f32",
    "one_minus_pow",
    "lr_at",
]


def scalar_f32(x: Any) -> jax.Array:
    """A hyperparameter as a 0-d array of at least float32 precision.

    Scalar factors (bias corrections, bounds, the AvaGrad normalization) are computed in this
    precision and cast to each leaf's dtype only when applied, so ``0.999 ** t`` is not rounded
    in bfloat16.
    """
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def one_minus_pow(decay: Any, count: jax.Array) -> jax.Array:
    """``1 - decay**count`` for an integer ``count >= 0``, accurate when ``decay`` is near 1.

    Evaluated as ``-expm1(count * log(decay))``. The direct float32 form loses about 5 digits to
    cancellation at ``decay = 0.999`` and small ``count``; PyTorch evaluates it in float64. For a
    Python-number ``decay`` the logarithm is taken in float64 before rounding, so the result
    matches the float64 value to float32 precision. ``decay = 0`` is handled without ``log(0)``:
    the result is 1 for ``count > 0`` and 0 at ``count = 0``.
    """
    if isinstance(decay, (int, float)) and not isinstance(decay, bool):
        dtype = jnp.promote_types(jnp.result_type(float), jnp.float32)
        positive = jnp.asarray(decay > 0)
        log_decay = jnp.asarray(math.log(decay) if decay > 0 else 0.0, dtype)
    else:
        decay = scalar_f32(decay)
        dtype = decay.dtype
        positive = decay > 0
        log_decay = jnp.log(jnp.where(positive, decay, jnp.ones_like(decay)))
    count = jnp.asarray(count).astype(dtype)
    value = -jnp.expm1(count * log_decay)
    return jnp.where(positive, value, (count > 0).astype(dtype))


def lr_at(learning_rate: Any, count: jax.Array) -> Any:
    """The learning rate at 0-based step ``count``: ``learning_rate(count)`` for a schedule."""
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _is_static_zero(x: Any) -> bool:
    """True for a concrete scalar 0 (Python, NumPy or concrete JAX); False for tracers and schedules."""
    if isinstance(x, bool) or callable(x) or isinstance(x, jax.core.Tracer):
        return False
    try:
        array = np.asarray(x)
    except (TypeError, ValueError):
        return False
    return array.ndim == 0 and array.dtype.kind in "iuf" and float(array) == 0.0


def missing_params_error(fn: str, weight_decay: Any) -> ValueError:
    """The error for a weight-decaying ``update`` called without ``params``.

    Written here rather than taken from optax (``optax.NO_PARAMS_MSG`` is absent from some optax
    releases, e.g. 0.2.8), so the message is the same with every optax version and names the optimizer.
    """
    shown = "a traced value" if isinstance(weight_decay, jax.core.Tracer) else repr(weight_decay)
    return ValueError(
        f"{fn}: weight_decay={shown} needs the current parameters, but update() got params=None; "
        f"call tx.update(grads, state, params), or use weight_decay=0 to update without params")


def _decay_leaves(updates, params, factor):
    return jax.tree.map(
        lambda g, p: None if g is None else (g + factor * p).astype(g.dtype),
        updates,
        params,
        is_leaf=lambda x: x is None,
    )


class DecayAfterFirstStepState(NamedTuple):
    """State of ``add_decayed_weights(..., skip_first_step=True)``: the number of updates so far."""

    count: jax.Array  # int32, shape ()


def add_decayed_weights(
    weight_decay: Any, *, skip_first_step: bool = False, fn: str = "add_decayed_weights"
) -> optax.GradientTransformationExtraArgs:
    """Add ``weight_decay * params`` to the updates: ``u <- u + wd * p``.

    Placed before the moment estimates this is an L2 penalty; placed after the adaptive scaling
    it is decoupled decay. Unlike ``optax.add_decayed_weights`` it does not require ``params``
    when ``weight_decay`` is a concrete 0 (so ``avagrad()`` works with ``update(g, s)``), the
    output keeps the updates' dtype, and a nonzero (or traced) ``weight_decay`` with
    ``params=None`` raises a ``ValueError`` naming ``fn`` and ``weight_decay`` (with every optax
    version; optax's own message constant is not in all releases).

    Args:
      weight_decay: decay coefficient (a number or a traced 0-d array, never branched on).
      skip_first_step: if True the decay is multiplied by 0 on the first update and by 1 after
        (AvaGradW's official code decays only inside its ``step > 1`` branch).
      fn: the optimizer's name, used in the error for a missing ``params``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """

    def init_fn(params):
        del params
        if skip_first_step:
            return DecayAfterFirstStepState(count=jnp.zeros([], jnp.int32))
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if skip_first_step:
            new_state = DecayAfterFirstStepState(count=optax.safe_increment(state.count))
        else:
            new_state = state
        if _is_static_zero(weight_decay):
            return updates, new_state
        if params is None:
            raise missing_params_error(fn, weight_decay)
        factor = weight_decay
        if skip_first_step:
            factor = jnp.where(state.count > 0, weight_decay, jnp.zeros_like(weight_decay))
        return _decay_leaves(updates, params, factor), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
