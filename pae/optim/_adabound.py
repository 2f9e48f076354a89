r"""AdaBound, AMSBound and AdaBoundW as optax gradient transformations.

Luo, Xiong, Liu, Sun, "Adaptive Gradient Methods with Dynamic Bound of Learning Rate", ICLR 2019,
arXiv 1902.09843. Official PyTorch code: github.com/Luolc/AdaBound, ``adabound/adabound.py``.
See also Savarese, "On the Convergence of AdaBound and its Connection to SGD", arXiv 1908.04457,
for the bound functions' analysis and the SGD-with-dampened-momentum equivalent (:func:`csgd`).

AdaBound is Adam whose per-coordinate learning rate is clipped into ``[lower(t), upper(t)]``; both
bounds converge to ``final_lr``, so the method moves from Adam-like to SGD-like during training.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pae.optim import _checks
from pae.optim._common import add_decayed_weights, lr_at, one_minus_pow, scalar_f32

__all__ = [
    "ScaleByAdaBoundState",
    "adabound_bounds",
    "scale_by_adabound",
    "adabound",
    "amsbound",
    "adaboundw",
]


class ScaleByAdaBoundState(NamedTuple):
    """State of :func:`scale_by_adabound`.

    Attributes:
      count: number of updates made so far (int32, shape ``()``).
      mu: first moment ``m_t`` (not debiased).
      nu: raw second moment ``v_t`` (not debiased).
      nu_max: AMSBound's running elementwise maximum of the raw ``v_t``; ``None`` for AdaBound.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates | None


def adabound_bounds(final_lr: Any, gamma: Any, step: Any) -> tuple[jax.Array, jax.Array]:
    r"""AdaBound's learning-rate bounds at 1-based step ``t`` (the official code's functions).

    .. math::

      \eta_l(t) = \alpha^* \Big(1 - \frac{1}{\gamma t + 1}\Big), \qquad
      \eta_u(t) = \alpha^* \Big(1 + \frac{1}{\gamma t}\Big)

    ``gamma = 0`` disables the clipping (Adam with AdaBound's eps placement): the lower bound is 0
    and the upper bound is the largest finite float, not ``inf``, so no inf or NaN is ever formed
    (``1/(gamma t)`` uses a safe denominator; the official code raises ZeroDivisionError there). The lower bound is evaluated as
    ``alpha* gamma t / (gamma t + 1)``, the same number without float32 cancellation (the official
    code computes the bounds in Python doubles).

    Args:
      final_lr: ``alpha^*``, the common limit of both bounds (already scaled by any schedule).
      gamma: convergence speed of the bounds, in [0, 1).
      step: 1-based update index ``t``.

    Returns:
      ``(lower, upper)`` as float32 (or wider) 0-d arrays.
    """
    final_lr, gamma = scalar_f32(final_lr), scalar_f32(gamma)
    gt = gamma * jnp.asarray(step, final_lr.dtype)
    # fl * (1 - 1/(gt + 1)) written as fl * gt / (gt + 1): no cancellation in float32 at small gt.
    lower = final_lr * (gt / (gt + 1))
    positive = gt > 0
    safe_gt = jnp.where(positive, gt, jnp.ones_like(gt))
    no_bound = jnp.finfo(final_lr.dtype).max
    upper = jnp.where(positive, final_lr * (1 + 1 / safe_gt), no_bound)
    return lower, upper.astype(lower.dtype)


def _resolve_reference_lr(fn: str, learning_rate: Any, reference_lr: Any) -> Any:
    """The learning rate the bounds are relative to (PyTorch's ``base_lr``): ``reference_lr``, or a
    numeric ``learning_rate``; a schedule needs ``reference_lr`` (its value at step 0 is not the
    nominal lr when it warms up)."""
    if reference_lr is not None:
        _checks.check_positive(fn, "reference_lr", reference_lr)
        return reference_lr
    if callable(learning_rate):
        raise ValueError(
            f"{fn}: learning_rate is a schedule; pass reference_lr=<its nominal (peak) lr, > 0>: the "
            "bounds follow it as final_lr * lr_t / reference_lr (PyTorch's base_lr, the lr the "
            "optimizer was built with), which a schedule does not tell (it may warm up)")
    return learning_rate


def _validate_adabound(
    fn: str, learning_rate: Any, final_lr: Any, b1: Any, b2: Any, gamma: Any, eps: Any
) -> None:
    _checks.check_nonnegative(fn, "learning_rate", learning_rate, schedule_ok=True)
    _checks.check_nonnegative(fn, "final_lr", final_lr)
    _checks.check_unit_interval(fn, "b1", b1)
    _checks.check_unit_interval(fn, "b2", b2)
    _checks.check_unit_interval(fn, "gamma", gamma)
    _checks.check_nonnegative(fn, "eps", eps)


def scale_by_adabound(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    final_lr: Any = 0.1,
    b1: Any = 0.9,
    b2: Any = 0.999,
    gamma: Any = 1e-3,
    eps: Any = 1e-8,
    *,
    amsbound: bool = False,
    reference_lr: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaBound's clipped adaptive step, *including* the learning rate (unsigned).

    With ``t`` the 1-based update index and ``alpha_t`` the learning rate at the 0-based index
    ``t - 1`` (a schedule is evaluated like ``optax.scale_by_learning_rate`` does):

    .. math::

      m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
      \hat v_t &= v_t \;\text{(AdaBound)}, \qquad \hat v_t = \max(\hat v_{t-1}, v_t)
        \;\text{(AMSBound)} \\
      \alpha^*_t &= \alpha^* \, \alpha_t / \alpha_{\mathrm{ref}} \\
      u_t &= \mathrm{clip}\Big(\frac{\alpha_t \sqrt{1-\beta_2^t}}{(1-\beta_1^t)
              (\sqrt{\hat v_t} + \epsilon)},\; \eta_l(t),\; \eta_u(t)\Big) \odot m_t

    with the bounds of :func:`adabound_bounds` evaluated at ``alpha*_t``. The caller descends with
    ``x_t = x_{t-1} - u_t`` (the aliases negate). Choices, each following the official code
    (``adabound.py``) rather than the paper's Algorithm 2:

    * The learning rate is *inside* the clip (clipping a unit-lr step and multiplying by ``lr``
      afterwards is a different algorithm), which is why this transformation takes
      ``learning_rate`` instead of being followed by ``optax.scale_by_learning_rate``.
    * The clip acts on the fully debiased rate, including ``1/(1 - b1^t)``; ``m`` is not debiased
      separately. There is no ``1/sqrt(t)`` factor and no projection (those exist only in the
      paper's theory).
    * ``eps`` is added to the square root of the *raw* second moment, before the
      ``sqrt(1 - b2^t)`` debias (pre-2019 PyTorch-Adam placement; it differs from
      ``optax.scale_by_adam``).
    * AMSBound takes the running maximum over the *raw* ``v`` (``optax.scale_by_amsgrad`` takes
      it over the debiased one by default).
    * The bounds follow the learning-rate schedule relative to a reference learning rate:
      ``final_lr * lr_t / reference_lr`` (PyTorch stores ``base_lr`` at construction). By default
      ``reference_lr`` is ``learning_rate`` when it is a number; a schedule needs it given (a
      ValueError says so: ``learning_rate(0)`` is not the nominal lr of a warmup).
      Under ``optax.inject_hyperparams`` the factory is rebuilt each step with the current lr,
      so pass ``reference_lr`` explicitly there if the bounds should follow the schedule.
      If the reference is 0 (only when the lr is the constant 0) the ratio is taken as 0 and the
      update is zero instead of PyTorch's 0/0.

    Args:
      learning_rate: ``alpha``, a number >= 0 or a schedule.
      final_lr: ``alpha*`` >= 0, the SGD learning rate both bounds converge to.
      b1: first-moment decay in [0, 1).
      b2: second-moment decay in [0, 1).
      gamma: convergence speed of the bounds, in [0, 1); 0 disables the clipping (see
        :func:`adabound_bounds`).
      eps: >= 0, added to ``sqrt(v)``.
      amsbound: use AMSBound (running max of the raw second moment).
      reference_lr: optional reference learning rate (> 0) for the bounds, see above.
      mu_dtype: optional dtype of the first moment (default: the parameters' dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; updates keep the gradients' dtype and state
      dtypes never change. Real-valued parameters only.

    References:
      Luo et al., arXiv 1902.09843; github.com/Luolc/AdaBound; Savarese, arXiv 1908.04457.
    """
    fn = "scale_by_adabound"
    _validate_adabound(fn, learning_rate, final_lr, b1, b2, gamma, eps)
    reference = _resolve_reference_lr(fn, learning_rate, reference_lr)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        return ScaleByAdaBoundState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
            nu_max=optax.tree.zeros_like(params) if amsbound else None,
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        grads, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)

        count = optax.safe_increment(state.count)
        lr = scalar_f32(lr_at(learning_rate, state.count))
        ref = scalar_f32(reference)
        ratio = jnp.where(ref > 0, lr / jnp.where(ref > 0, ref, 1), jnp.zeros_like(lr))
        lower, upper = adabound_bounds(scalar_f32(final_lr) * ratio, gamma, count)
        step_size = lr * jnp.sqrt(one_minus_pow(b2, count)) / one_minus_pow(b1, count)

        new_mus = [((1 - b1) * g + b1 * m).astype(m.dtype) for g, m in zip(grads, mus)]
        new_nus = [((1 - b2) * jnp.square(g) + b2 * v).astype(v.dtype) for g, v in zip(grads, nus)]
        if amsbound:
            maxes = treedef.flatten_up_to(state.nu_max)
            new_maxes = [jnp.maximum(vm, v.astype(vm.dtype)) for vm, v in zip(maxes, new_nus)]
            second = new_maxes
        else:
            second = new_nus

        out = []
        for g, m, v in zip(grads, new_mus, second):
            dtype = jnp.promote_types(m.dtype, v.dtype)
            denom = jnp.sqrt(v.astype(dtype)) + jnp.asarray(eps, dtype)
            hi = jnp.minimum(upper, jnp.finfo(dtype).max).astype(dtype)  # no overflow in bf16/f16
            rate = jnp.clip(step_size.astype(dtype) / denom, lower.astype(dtype), hi)
            out.append((rate * m.astype(dtype)).astype(g.dtype))

        return treedef.unflatten(out), ScaleByAdaBoundState(
            count=count,
            mu=treedef.unflatten(new_mus),
            nu=treedef.unflatten(new_nus),
            nu_max=treedef.unflatten(new_maxes) if amsbound else None,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _validate_alias(fn, learning_rate, final_lr, b1, b2, gamma, eps, weight_decay, reference_lr):
    _validate_adabound(fn, learning_rate, final_lr, b1, b2, gamma, eps)
    _checks.check_nonnegative(fn, "weight_decay", weight_decay)
    _resolve_reference_lr(fn, learning_rate, reference_lr)


def adabound(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    final_lr: Any = 0.1,
    b1: Any = 0.9,
    b2: Any = 0.999,
    gamma: Any = 1e-3,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    amsbound: bool = False,
    *,
    reference_lr: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaBound (or AMSBound) with L2 weight decay, as the official ``AdaBound`` class.

    ``g_t <- g_t + weight_decay * x_{t-1}`` (before both moments), then
    ``x_t = x_{t-1} - u_t`` with ``u_t`` from :func:`scale_by_adabound` (learning rate inside the
    clip). Defaults are the official ones: ``lr=1e-3, betas=(0.9, 0.999), final_lr=0.1,
    gamma=1e-3, eps=1e-8, weight_decay=0, amsbound=False``.

    Args:
      learning_rate, final_lr, b1, b2, gamma, eps, amsbound, reference_lr, mu_dtype: see
        :func:`scale_by_adabound`.
      weight_decay: L2 coefficient >= 0. ``params`` must be passed to ``update`` unless it is the
        number 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from pae.optim import adabound
      >>> tx = adabound(learning_rate=1e-3, final_lr=0.1)
      >>> params = {"w": jnp.zeros(2)}
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> jnp.round(updates["w"], 6)  # step 1 is Adam-like, -lr * sign(g), inside the bounds
      Array([-0.001, -0.001], dtype=float32)

    References:
      Luo et al., arXiv 1902.09843; github.com/Luolc/AdaBound ``adabound/adabound.py``.
    """
    _validate_alias(
        "adabound", learning_rate, final_lr, b1, b2, gamma, eps, weight_decay, reference_lr
    )
    return _l2_adabound(
        "amsbound" if amsbound is True else "adabound", learning_rate, final_lr, b1, b2, gamma,
        eps, weight_decay, amsbound, reference_lr, mu_dtype,
    )


def _l2_adabound(fn, learning_rate, final_lr, b1, b2, gamma, eps, weight_decay, amsbound,
                 reference_lr, mu_dtype):
    """AdaBound/AMSBound with L2 decay added to the gradient; ``fn`` names it in errors."""
    return optax.chain(
        add_decayed_weights(weight_decay, fn=fn),
        scale_by_adabound(
            learning_rate, final_lr, b1, b2, gamma, eps,
            amsbound=amsbound, reference_lr=reference_lr, mu_dtype=mu_dtype,
        ),
        optax.scale(-1.0),
    )


def amsbound(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    final_lr: Any = 0.1,
    b1: Any = 0.9,
    b2: Any = 0.999,
    gamma: Any = 1e-3,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    reference_lr: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AMSBound: :func:`adabound` with ``amsbound=True`` (running max of the raw ``v_t``).

    ``v_hat_t = max(v_hat_{t-1}, v_t)`` replaces ``v_t`` in the denominator
    ``sqrt(v_hat_t) + eps``; everything else as :func:`adabound` (L2 weight decay).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Luo et al., arXiv 1902.09843 (AMSBound); github.com/Luolc/AdaBound.
    """
    _validate_alias(
        "amsbound", learning_rate, final_lr, b1, b2, gamma, eps, weight_decay, reference_lr
    )
    return _l2_adabound(
        "amsbound", learning_rate, final_lr, b1, b2, gamma, eps, weight_decay, True,
        reference_lr, mu_dtype,
    )


def adaboundw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    final_lr: Any = 0.1,
    b1: Any = 0.9,
    b2: Any = 0.999,
    gamma: Any = 1e-3,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    amsbound: bool = False,
    *,
    reference_lr: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaBound (or AMSBound) with decoupled weight decay, as the official ``AdaBoundW`` class.

    .. math::

      x_t = x_{t-1} - u_t - \lambda x_{t-1}

    The decay is *not* multiplied by the learning rate (unlike PyTorch AdamW and unlike
    :func:`avagradw`): with the default lr 1e-3 a given ``weight_decay`` is about 1000x stronger
    than in AdamW. It does not enter the moments and is applied from the first update on.

    Args:
      learning_rate, final_lr, b1, b2, gamma, eps, amsbound, reference_lr, mu_dtype: see
        :func:`scale_by_adabound`.
      weight_decay: decoupled coefficient ``lambda`` >= 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Luo et al., arXiv 1902.09843; github.com/Luolc/AdaBound ``adabound/adabound.py``
      (class ``AdaBoundW``).
    """
    _validate_alias(
        "adaboundw", learning_rate, final_lr, b1, b2, gamma, eps, weight_decay, reference_lr
    )
    return optax.chain(
        scale_by_adabound(
            learning_rate, final_lr, b1, b2, gamma, eps,
            amsbound=amsbound, reference_lr=reference_lr, mu_dtype=mu_dtype,
        ),
        add_decayed_weights(weight_decay, fn="adaboundw"),
        optax.scale(-1.0),
    )
