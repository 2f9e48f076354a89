r"""CSGD: SGD with dampened, bias-corrected momentum.

Savarese, "On the Convergence of AdaBound and its Connection to SGD", arXiv 1908.04457.
Official PyTorch code: github.com/lolemacs/adabound-and-csgd, ``csgd.py``.

AdaBound's first moment is ``m_t = b1 m_{t-1} + (1 - b1) g_t``, while PyTorch SGD's momentum buffer
``b1 m_{t-1} + g_t`` is ``1/(1 - b1)`` times larger. The report shows that SGD with dampening equal
to the momentum (plus bias correction) matches AdaBound on CIFAR-10; CSGD is that optimizer.
"""
from __future__ import annotations

from typing import Any

import jax
import optax

from pae.optim import _checks
from pae.optim._common import add_decayed_weights

__all__ = ["csgd"]


def csgd(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    momentum: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with dampened (``dampening = momentum``), bias-corrected momentum and L2 decay.

    .. math::

      g_t &\leftarrow g_t + \lambda x_{t-1} \\
      b_t &= \mu\, b_{t-1} + (1 - \mu)\, g_t, \qquad b_0 = 0 \\
      x_t &= x_{t-1} - \frac{\alpha_t}{1 - \mu^t}\, b_t

    With ``momentum = 0`` this is plain SGD (``1 - 0^t = 1``), as in the official code's
    ``momentum == 0`` branch. Built from optax blocks: L2 decay, ``optax.ema(momentum,
    debias=True)`` and ``optax.scale_by_learning_rate``. Official defaults: ``lr=0.1, momentum=0,
    weight_decay=0``; the report's CIFAR setting is ``lr=0.1, momentum=0.9, weight_decay=5e-4``.
    ``optax.sgd(momentum=...)`` is the undampened form (``b_t = mu b_{t-1} + g_t``) instead.

    Args:
      learning_rate: ``alpha``, a number >= 0 or a schedule.
      momentum: ``mu`` in [0, 1) (the official code checks only ``>= 0``; 1 would divide by
        ``1 - 1^t = 0``).
      weight_decay: L2 coefficient ``lambda`` >= 0 (added to the gradient before the momentum).
      accumulator_dtype: optional dtype of the momentum buffer (the updates keep the gradients'
        dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from pae.optim import csgd
      >>> tx = csgd(learning_rate=0.1, momentum=0.9)
      >>> params = jnp.zeros(2)
      >>> updates, _ = tx.update(jnp.ones(2), tx.init(params), params)
      >>> jnp.round(updates, 6)  # bias correction: step 1 is -lr * g whatever the momentum
      Array([-0.1, -0.1], dtype=float32)

    References:
      Savarese, arXiv 1908.04457; github.com/lolemacs/adabound-and-csgd ``csgd.py``.
    """
    fn = "csgd"
    _checks.check_nonnegative(fn, "learning_rate", learning_rate, schedule_ok=True)
    _checks.check_unit_interval(fn, "momentum", momentum)
    _checks.check_nonnegative(fn, "weight_decay", weight_decay)
    return optax.chain(
        add_decayed_weights(weight_decay, fn=fn),
        _ema_in_grad_dtype(momentum, accumulator_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )


def _ema_in_grad_dtype(momentum: Any, accumulator_dtype: Any) -> optax.GradientTransformation:
    """``optax.ema(momentum, debias=True)`` whose updates are cast back to each gradient's dtype
    (optax returns them in ``accumulator_dtype``)."""
    ema = optax.ema(momentum, debias=True, accumulator_dtype=accumulator_dtype)

    def update_fn(updates, state, params=None):
        out, state = ema.update(updates, state, params)
        return jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates), state

    return optax.GradientTransformation(ema.init, update_fn)
