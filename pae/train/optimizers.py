"""Optimizers by name, with PyTorch-style coupled L2 weight decay unless the name says otherwise.

``make_optimizer("nesterov", schedule, weight_decay=5e-4)`` is
``optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, 0.9, nesterov=True))``: decay is
added to the gradient before momentum, as ``torch.optim.SGD(weight_decay=...)`` does. ``adamw`` and
the ``*w`` optimizers of :mod:`pae.optim` decouple it.
"""
from __future__ import annotations

from typing import Any, Callable

import optax

Schedule = float | optax.Schedule


def _coupled(weight_decay: float, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx


_BUILTIN: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda lr, wd, m, **kw: _coupled(wd, optax.sgd(lr, **kw)),
    "momentum": lambda lr, wd, m, **kw: _coupled(wd, optax.sgd(lr, momentum=m, **kw)),
    "nesterov": lambda lr, wd, m, **kw: _coupled(wd, optax.sgd(lr, momentum=m, nesterov=True, **kw)),
    "adam": lambda lr, wd, m, **kw: _coupled(wd, optax.adam(lr, **kw)),
    "adamw": lambda lr, wd, m, **kw: optax.adamw(lr, weight_decay=wd, **kw),
}
#: Optimizers of :mod:`pae.optim`, built with ``learning_rate`` and ``weight_decay`` keywords.
PAE_OPTIMIZERS = ("avagrad", "avagradw", "adabound", "amsbound", "adaboundw", "csgd")
NAMES = tuple(_BUILTIN) + PAE_OPTIMIZERS


#: AdaBound's bounds follow the schedule relative to a nominal lr (PyTorch's ``base_lr``).
_NEEDS_REFERENCE_LR = ("adabound", "amsbound", "adaboundw")


def make_optimizer(name: str, learning_rate: Schedule, *, weight_decay: float = 0.0,
                   momentum: float = 0.9, reference_lr: float | None = None,
                   **kwargs: Any) -> optax.GradientTransformation:
    """Build the named optimizer; extra keyword arguments go to the underlying constructor.

    ``reference_lr`` is the schedule's nominal (peak) learning rate; the AdaBound family scales its
    bounds by ``lr_t / reference_lr`` (others ignore it). It is needed when the schedule starts at
    0 (warm-up).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if name in _NEEDS_REFERENCE_LR and reference_lr is not None:
        kwargs.setdefault("reference_lr", reference_lr)
    if name in _BUILTIN:
        return _BUILTIN[name](learning_rate, weight_decay, momentum, **kwargs)
    if name in PAE_OPTIMIZERS:
        from pae import optim

        if name == "csgd":
            kwargs.setdefault("momentum", momentum)
        return getattr(optim, name)(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(NAMES)}")


#: The lr schedule kinds of :func:`make_schedule`.
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(kind: str, base_lr: float, steps_per_epoch: int, epochs: int, *,
                  milestones: tuple[int, ...] = (), decay: float = 0.1,
                  warmup_epochs: int = 0) -> optax.Schedule:
    """Learning rate per step.

    ``constant``; ``cosine`` (to 0 over the run); ``step``: multiply by ``decay`` at each epoch in
    ``milestones`` (constant within an epoch, as PyTorch's ``MultiStepLR`` stepped per epoch).
    ``warmup_epochs`` prepends a linear ramp from 0.
    """
    if base_lr < 0:
        raise ValueError(f"learning_rate must be >= 0, got {base_lr}")
    total = steps_per_epoch * epochs
    warmup = steps_per_epoch * warmup_epochs
    if kind == "constant":
        main = optax.constant_schedule(base_lr)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(base_lr, max(total - warmup, 1))
    elif kind == "step":
        if any(m <= 0 for m in milestones) or list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing positive epochs, got {milestones}")
        main = optax.piecewise_constant_schedule(
            base_lr, {m * steps_per_epoch - warmup: decay for m in milestones})
    else:
        raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])
