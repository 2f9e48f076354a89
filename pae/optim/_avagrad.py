r"""AvaGrad and AvaGradW as optax gradient transformations.

Savarese, McAllester, Babu, Maire, "Domain-independent Dominance of Adaptive Methods",
arXiv 1912.01823 (CVPR 2021). Official PyTorch code: github.com/lolemacs/avagrad, ``optimizers.py``.

AvaGrad is Adam with two changes: the per-coordinate rate uses the second moment of the *previous*
step (so it does not depend on the current gradient), and the vector of per-coordinate rates is
rescaled to unit RMS, which decouples the learning rate (overall step size) from ``eps`` (how
non-uniform the per-coordinate rates may be).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pae.optim import _checks
from pae.optim._common import add_decayed_weights, one_minus_pow

__all__ = ["ScaleByAvaGradState", "AVAGRAD_FORMS", "scale_by_avagrad", "avagrad", "avagradw"]

AVAGRAD_FORMS = ("official", "paper")


class ScaleByAvaGradState(NamedTuple):
    """State of :func:`scale_by_avagrad`.

    Attributes:
      count: number of updates made so far (int32, shape ``()``).
      mu: first moment ``m_t``, one leaf per parameter.
      sqrt_nu: square root of the raw (not debiased) second moment, ``sqrt(v_t)``. It is stored
        instead of ``v_t`` because every use of ``v`` (the step and the normalization) needs its
        square root: one ``sqrt`` per element per step instead of two, and none inside the
        normalization's reduction (the part that is slow on XLA:CPU). ``v_t = sqrt_nu**2``.
      gamma: the global normalization scalar (shape ``()``; float32, or float64 when a parameter
        is float64). With ``form="official"`` it is the value the *next* update will use
        (computed one step early, as the official code stores ``group['gamma']``); with
        ``form="paper"`` it is the value the last update used. Its initial value 1.0 is never
        read: the first update is zero.
    """

    count: jax.Array
    mu: optax.Updates
    sqrt_nu: optax.Updates
    gamma: jax.Array


def _validate_avagrad(fn: str, b1: Any, b2: Any, eps: Any, form: str) -> None:
    _checks.check_unit_interval(fn, "b1", b1)
    _checks.check_unit_interval(fn, "b2", b2)
    # eps = 0 is rejected, not just eps < 0: with v_0 = 0 the official normalization at step 2 is
    # exactly eps, so eps = 0 gives 0 * inf = NaN on the second update.
    _checks.check_positive(fn, "eps", eps)
    _checks.check_choice(fn, "form", form, AVAGRAD_FORMS)


_SMALL_LEAF = 1 << 16  # leaves below this many elements are reduced together


def _unsharded(x: jax.Array) -> bool:
    """False for an array whose type carries an explicit sharding over some axis (``ravel`` and
    ``concatenate`` of those need an explicit output sharding, so they are reduced on their own)."""
    try:
        spec = jax.typeof(x).sharding.spec
    except (AttributeError, TypeError):
        return True
    return all(axis is None for axis in spec)


def _global_inverse_rms(
    sqrt_nus: list[jax.Array], inv_sqrt_bias: jax.Array, eps: Any, dtype: Any, salt: jax.Array
) -> jax.Array:
    r"""``1 / RMS(1/rho)``, ``rho = sqrt(v) * inv_sqrt_bias + eps``, over every element of every leaf.

    Equals ``sqrt(d / sum_i rho_i^{-2})``, accumulated in ``dtype`` (float32 or wider); 1 for an
    empty pytree. ``sqrt_nus`` are the leaves of ``sqrt(v)``; ``salt`` is any finite runtime
    scalar (the step count).

    The arithmetic is ordinary; the *form* is chosen for XLA:CPU, where a naive
    ``sum(1 / (sqrt(v) * c + eps)**2)`` over a ResNet-50 pytree cost several times an
    elementwise pass (measured on 2 cores; see experiments/bench_optimizers.py): each leaf gets
    its own scalars ``c + z_i``, ``eps + z_i`` and ``1 + z_i`` with a distinct runtime zero
    ``z_i = 0 * (salt + i)``. Otherwise the compiler shares one ``broadcast`` of each scalar
    between all same-shape leaves and then *materializes* it as a full array that every reduction
    reads. The many tiny leaves (biases, norms) are concatenated and reduced once.
    """
    size = sum(int(s.size) for s in sqrt_nus)
    if size == 0:
        return jnp.ones([], dtype)
    inv_sqrt_bias = inv_sqrt_bias.astype(dtype)
    eps = jnp.asarray(eps, dtype)
    salt = jnp.asarray(salt).astype(dtype)
    small = [s.astype(dtype).ravel() for s in sqrt_nus if s.size < _SMALL_LEAF and _unsharded(s)]
    groups = [s.astype(dtype) for s in sqrt_nus if not (s.size < _SMALL_LEAF and _unsharded(s))]
    if small:
        groups.append(jnp.concatenate(small) if len(small) > 1 else small[0])
    total = jnp.zeros([], dtype)
    for i, s in enumerate(groups):
        zero = 0 * (salt + i)
        inv_rho = (1 + zero) / (s * (inv_sqrt_bias + zero) + (eps + zero))
        total = total + jnp.sum(jnp.square(inv_rho))
    return jnp.sqrt(size / total).astype(dtype)


def _gamma_dtype(params: Any) -> jnp.dtype:
    """float32, or float64 when some parameter is float64 (fixed at init, so stable)."""
    dtype = jnp.dtype(jnp.float32)
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            dtype = jnp.promote_types(dtype, leaf.dtype)
    return dtype


def scale_by_avagrad(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 0.1,
    *,
    form: str = "official",
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by AvaGrad's delayed, globally normalized adaptive rates.

    With ``t`` the 1-based update index, ``g_t`` the incoming updates (gradients), and all
    operations elementwise except the sum over coordinates ``i`` of *every leaf* the transformation
    sees (``d`` coordinates in total):

    .. math::

      m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
      \eta_t &= 1 / \big(\sqrt{v_{t-1} / (1 - \beta_2^{t-1})} + \epsilon\big)
              \quad\text{(delayed second moment)} \\
      u_t &= \gamma_t \, \eta_t \, m_t / (1 - \beta_1^{t}) \quad (t \ge 2), \qquad u_1 = 0 \\
      v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2

    and the normalization ``gamma_t = 1 / RMS(1/rho)`` = ``sqrt(d / sum_i rho_i^{-2})`` with

    * ``form="official"`` (default, the released code): ``rho = sqrt(v_{t-2} / (1 - b2^{t-1})) +
      eps``, i.e. the scalar is computed at the end of step ``t-1`` from the second moment *before*
      that step's update, debiased with that step's factor. It is one step stale: at ``t = 2``,
      ``v_0 = 0`` gives ``gamma_2 = eps`` exactly.
    * ``form="paper"`` (Algorithm 2 of the paper): ``rho = 1/eta_t``, the same ``v_{t-1}`` as the
      step. Everything else (bias corrections, zero first step, eps placement) is kept identical
      to the official code, so the two forms differ only in which second moment ``gamma`` sees.
      (The printed algorithm as transcribed in our notes has no bias correction at all; that
      detail is unverified against the PDF, and with ``v_0 = 0`` its bias-corrected version needs
      the zero first step anyway.)

    Choices, each following the official code (``optimizers.py``, class ``AvaGrad``):

    * The first update is exactly zero (the code updates only ``if step > 1``); ``m`` and ``v``
      are still updated. The guard replaces ``1 - b2^0 = 0`` by 1 *before* dividing, so neither
      branch of the selection can produce a NaN or inf (gradients through the update stay finite).
    * ``eps`` is added *outside* the square root, after debiasing ``v``.
    * The normalization is one scalar over all leaves the transformation sees, like one PyTorch
      param group (the script passes the whole model as one group). Use ``optax.multi_transform``
      or ``optax.partition`` to get several groups; leaves removed by ``optax.masked`` drop out of
      ``d`` and of the sum. The sum is accumulated in float32 (float64 for float64 parameters).
    * ``gamma`` does not depend on the learning rate, which the aliases apply afterwards.
    * The state keeps ``sqrt(v)`` rather than ``v`` (same numbers up to rounding; see
      :class:`ScaleByAvaGradState`), which keeps the update within ~1.25x of ``optax.adam``'s time.

    Args:
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: adaptability, > 0. It is meant to be large: the class default is 0.1, the CIFAR script
        uses 1e-3. Large eps makes AvaGrad SGD-with-momentum-like with step ``lr``.
      form: ``"official"`` (stale normalization, default) or ``"paper"`` (see above).
      mu_dtype: optional dtype of the first moment (default: the parameters' dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose updates are the *unsigned* direction
      ``u_t`` (chain ``optax.scale_by_learning_rate`` to descend); extra keyword arguments to
      ``update`` are accepted and ignored. Updates keep the gradients' dtype and state dtypes
      never change. Real-valued parameters only.

    References:
      Savarese et al., arXiv 1912.01823; github.com/lolemacs/avagrad.
    """
    _validate_avagrad("scale_by_avagrad", b1, b2, eps, form)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        return ScaleByAvaGradState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            sqrt_nu=optax.tree.zeros_like(params),
            gamma=jnp.ones([], _gamma_dtype(params)),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        grads, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        sqrt_nus = treedef.flatten_up_to(state.sqrt_nu)  # sqrt(v_{t-1})

        count = optax.safe_increment(state.count)
        first = count <= 1
        bc1 = one_minus_pow(b1, count)
        bc2 = one_minus_pow(b2, count)
        # 1 - b2^(t-1) is 0 at t = 1: substitute 1 before the sqrt/division, not after.
        bc2_prev = jnp.where(first, jnp.ones_like(bc2), one_minus_pow(b2, count - 1))
        sqrt_bc2_prev = jnp.sqrt(bc2_prev)
        acc = state.gamma.dtype

        if form == "paper":  # the same v_{t-1} and debias as the step below
            gamma = _global_inverse_rms(sqrt_nus, 1 / sqrt_bc2_prev, eps, acc, count)
        else:  # computed by the previous update
            gamma = state.gamma
        scale = jnp.where(first, jnp.zeros_like(bc1), gamma / bc1)

        new_mus, out, new_sqrt_nus = [], [], []
        for g, m, s in zip(grads, mus, sqrt_nus):
            m_new = ((1 - b1) * g + b1 * m).astype(m.dtype)
            dtype = jnp.promote_types(m.dtype, s.dtype)
            denom = s.astype(dtype) / sqrt_bc2_prev.astype(dtype) + jnp.asarray(eps, dtype)
            out.append((scale.astype(dtype) * (m_new.astype(dtype) / denom)).astype(g.dtype))
            new_mus.append(m_new)
            v_new = (1 - b2) * jnp.square(g) + b2 * jnp.square(s)
            new_sqrt_nus.append(jnp.sqrt(v_new).astype(s.dtype))

        if form == "paper":
            new_gamma = gamma
        else:
            # Official: the scalar for the NEXT step, from v_{t-1} (before this step's update of v)
            # debiased with this step's 1 - b2^t.
            new_gamma = _global_inverse_rms(sqrt_nus, 1 / jnp.sqrt(bc2), eps, acc, count)

        return treedef.unflatten(out), ScaleByAvaGradState(
            count=count,
            mu=treedef.unflatten(new_mus),
            sqrt_nu=treedef.unflatten(new_sqrt_nus),
            gamma=new_gamma.astype(state.gamma.dtype),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _validate_alias(fn: str, learning_rate, b1, b2, eps, weight_decay, form) -> None:
    _checks.check_nonnegative(fn, "learning_rate", learning_rate, schedule_ok=True)
    _validate_avagrad(fn, b1, b2, eps, form)
    _checks.check_nonnegative(fn, "weight_decay", weight_decay)


def avagrad(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 0.1,
    weight_decay: Any = 0.0,
    *,
    form: str = "official",
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AvaGrad with L2 weight decay, as in the official ``AvaGrad`` class.

    .. math::

      g_t \leftarrow g_t + \lambda x_{t-1}, \qquad
      x_t = x_{t-1} - \alpha_t \, u_t

    where ``u_t`` is :func:`scale_by_avagrad` (delayed second moment, zero first step, one
    global normalization scalar) and ``alpha_t`` the learning rate (a schedule is evaluated at the
    0-based update index, like ``optax.scale_by_learning_rate``). The decay is added to the
    gradient *before* both moments (L2 regularization, as the official code does in place on
    ``p.grad``), so it is adapted like the gradient. Defaults are the official class defaults
    (``lr=0.1, betas=(0.9, 0.999), eps=0.1, weight_decay=0``).

    Args:
      learning_rate: ``alpha``, a number >= 0 or a schedule.
      b1, b2, eps, form, mu_dtype: see :func:`scale_by_avagrad`.
      weight_decay: L2 coefficient ``lambda`` >= 0. ``params`` must be passed to ``update`` unless
        it is the number 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (``optax.chain`` of decay, scaling, lr).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from pae.optim import avagrad
      >>> params = {"w": jnp.ones(3)}
      >>> tx = avagrad(learning_rate=0.1, eps=0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
      >>> bool((updates["w"] == 0).all())  # the first AvaGrad update is zero
      True
      >>> round(float(state[1].gamma), 6)  # official form: the normalization for step 2 is eps
      0.1

    References:
      Savarese et al., arXiv 1912.01823; github.com/lolemacs/avagrad ``optimizers.py``.
    """
    _validate_alias("avagrad", learning_rate, b1, b2, eps, weight_decay, form)
    return optax.chain(
        add_decayed_weights(weight_decay, fn="avagrad"),
        scale_by_avagrad(b1, b2, eps, form=form, mu_dtype=mu_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )


def avagradw(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 0.1,
    weight_decay: Any = 0.0,
    *,
    form: str = "official",
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AvaGrad with decoupled weight decay, as in the official ``AvaGradW`` class.

    .. math::

      x_t = x_{t-1} - \alpha_t \big(u_t + \lambda x_{t-1}\big) \quad (t \ge 2), \qquad x_1 = x_0

    The decay is multiplied by the raw (scheduled) learning rate ``alpha_t`` only, not by the
    normalization ``gamma`` nor by ``1/(1 - b1^t)``, it does not enter the moments, and it is
    skipped on the first update (the official code decays inside its ``step > 1`` branch), so the
    first update is exactly zero. Same defaults as :func:`avagrad`.

    Args:
      learning_rate: ``alpha``, a number >= 0 or a schedule.
      b1, b2, eps, form, mu_dtype: see :func:`scale_by_avagrad`.
      weight_decay: decoupled coefficient ``lambda`` >= 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Savarese et al., arXiv 1912.01823; github.com/lolemacs/avagrad ``optimizers.py``
      (class ``AvaGradW``); decoupled decay after Loshchilov & Hutter, arXiv 1711.05101.
    """
    _validate_alias("avagradw", learning_rate, b1, b2, eps, weight_decay, form)
    return optax.chain(
        scale_by_avagrad(b1, b2, eps, form=form, mu_dtype=mu_dtype),
        add_decayed_weights(weight_decay, skip_first_step=True, fn="avagradw"),
        optax.scale_by_learning_rate(learning_rate),
    )
