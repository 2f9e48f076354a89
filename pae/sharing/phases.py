"""Training a soft-shared network on the one engine (:func:`pae.train.train_phases`).

The official recipe (lolemacs/soft-sharing ``main.py``): SGD with Nesterov momentum 0.9, lr 0.1,
x0.2 at epochs 60, 120 and 160 of 200, batch 128, weight decay 5e-4 coupled into the gradient on
every parameter *except the coefficients* (templates and BatchNorm are decayed). Here the
coefficients are a role (:data:`pae.sharing.COEFFICIENTS`), so :func:`sharing_optimizer` gives them
the same SGD without decay (and optionally their own lr). Soft sharing trains in one phase; start
from ``init_state(model, example, seed, transform.init)``. Folding (:func:`pae.sharing.fold`) is a
post-hoc step on the trained state (its loop structure depends on the trained coefficients).
"""
from __future__ import annotations

import dataclasses
import numbers

import jax.numpy as jnp
import numpy as np
import optax

from pae.core import Transform, identity, role_optimizer
from pae.sharing.bank import COEFFICIENTS, coefficient_matrices
from pae.sharing.similarity import similarity_matrix
from pae.train.engine import Phase

#: the official milestones as fractions of the 200 epochs
_OFFICIAL = (60 / 200, 120 / 200, 160 / 200)


@dataclasses.dataclass(frozen=True)
class SharingConfig:
    """Hyperparameters of :func:`sharing_phases` (defaults: the official CIFAR recipe).

    ``milestones=None``: the official 60/120/160 of 200 scaled to ``epochs``.
    ``coefficient_lr=None``: the weights' lr.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    coefficient_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] | None = None
    lr_decay: float = 0.2
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'seed' else 1}, got {v!r}")
        for name in ("lr", "momentum", "weight_decay", "lr_decay", "coefficient_lr"):
            v = getattr(self, name)
            if v is None and name == "coefficient_lr":
                continue
            if v is None or isinstance(v, (bool, str, bytes)) or np.ndim(v) != 0 or not np.isrealobj(v):
                raise TypeError(f"{name} must be a real number >= 0"
                                f"{' or None' if name == 'coefficient_lr' else ''}, got {v!r}")
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        if self.milestones is not None:
            if isinstance(self.milestones, (str, bytes)) or not np.iterable(self.milestones):
                raise TypeError(f"milestones must be a tuple of epochs or None, got {self.milestones!r}")
            object.__setattr__(self, "milestones", tuple(self.milestones))
            if not all(isinstance(m, numbers.Integral) and not isinstance(m, bool) and 0 < m < self.epochs
                       for m in self.milestones):
                raise ValueError(f"milestones must be epochs in (0, epochs={self.epochs}), got "
                                 f"{self.milestones}")
            if len(set(self.milestones)) != len(self.milestones):
                raise ValueError(f"milestones must be distinct epochs (each decays the lr once), got "
                                 f"{self.milestones}")

    @property
    def decay_epochs(self) -> tuple[int, ...]:
        if self.milestones is not None:
            return self.milestones
        return tuple(sorted({m for m in (round(self.epochs * f) for f in _OFFICIAL) if 0 < m < self.epochs}))


def _sgd(cfg: SharingConfig, lr: float, steps_per_epoch: int):
    sched = optax.piecewise_constant_schedule(
        lr, {int(m) * steps_per_epoch: cfg.lr_decay for m in cfg.decay_epochs})
    return optax.sgd(sched, momentum=cfg.momentum or None, nesterov=cfg.momentum > 0)


def sharing_optimizer(cfg: SharingConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Weights (templates, unshared layers, BatchNorm): coupled L2 then Nesterov SGD; coefficients:
    the same SGD, no decay (``coefficient_lr`` if given)."""
    weights = _sgd(cfg, cfg.lr, steps_per_epoch)
    if cfg.weight_decay:
        weights = optax.chain(optax.add_decayed_weights(cfg.weight_decay), weights)
    coef_lr = cfg.lr if cfg.coefficient_lr is None else cfg.coefficient_lr
    return role_optimizer({"weights": weights, COEFFICIENTS: _sgd(cfg, coef_lr, steps_per_epoch)})


def _lsm_metrics(state, ctx) -> dict:
    """Per group, the mean off-diagonal layer similarity (1: one layer repeated; 0: orthogonal)."""
    out = {}
    for name, (_, alpha) in coefficient_matrices(state.params).items():   # none: no rows (not raised)
        s = similarity_matrix(alpha)
        n = s.shape[-1]
        out[f"lsm_{name}"] = (jnp.sum(s, axis=(-2, -1)) - jnp.trace(s, axis1=-2, axis2=-1)) / (n * (n - 1))
    return out


def sharing_phases(cfg: SharingConfig, transform: Transform | None = None, *,
                   name: str = "train", eval_every: int = 1) -> list[Phase]:
    """``[Phase(name)]``: ``cfg.epochs`` of the official recipe under ``transform`` (a
    :func:`pae.sharing.templates`; None: the unshared baseline with the same recipe). Rows carry
    ``lsm_<group>``, the mean off-diagonal layer similarity of each group."""
    if transform is not None and not isinstance(transform, Transform):
        raise TypeError(f"transform must be a pae.Transform or None, got {type(transform).__name__}")

    def optimizer(spe):
        return sharing_optimizer(cfg, spe)

    return [Phase(name, cfg.epochs, optimizer, transform or identity(), eval_every=eval_every,
                  data_epochs_from=0, metrics=_lsm_metrics if transform is not None else None)]


__all__ = ["SharingConfig", "sharing_optimizer", "sharing_phases"]
