"""Noise-injected mixed-precision quantization as a list of phases on the one engine.

``quant_phases(cfg, select)`` is ``[noise, finetune]``: ``noise`` trains the weights and the
per-channel widths under quantization-matched noise (:func:`pae.quant.noise_injection`, widths with
their own Adam and no weight decay, as SMOL's Algorithm 1); entering ``finetune`` snaps every layer
to its palette (:func:`pae.quant.assign_palette`, host-side) and the weights are fine-tuned under the
real quantizer (:func:`pae.quant.palette_quantizer`) with a fresh optimizer. SMOL's CIFAR schedule
is 350 + 300 epochs; the defaults here are short. Start from
``init_state(model, example, seed, noise_transform(cfg, select).init)``.
"""
from __future__ import annotations

import dataclasses
import numbers

import jax
import numpy as np
import optax

from pae.core import Context, role_optimizer, select as pselect
from pae.quant import noise as qn
from pae.quant import palette as qp


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Hyperparameters of the two phases (see :func:`pae.quant.noise_injection` and
    :func:`pae.quant.assign_palette` for the meaning of the quantization fields).

    Weights: Adam (``lr``; ``finetune_lr`` in phase 2, default ``lr``), decoupled ``weight_decay``
    on the weights only; widths: Adam ``bits_lr`` (SMOL: 1e-3), no decay; a learned clip: Adam
    ``range_lr``, no decay.
    """

    noise_epochs: int = 10
    finetune_epochs: int = 5
    lr: float = 1e-3
    finetune_lr: float | None = None
    weight_decay: float = 0.0
    bits_lr: float = 1e-3
    range_lr: float = 1e-3
    b_min: float = 1.0
    b_max: float = 8.0
    b_init: float = 6.0
    granularity: str = "input"
    learned_range: bool = False
    lmbda: float = 0.0
    target_bits: float | None = None
    budget_weight: float = 1.0
    budget_form: str = "two_sided"
    eval_mode: str = "quantize"
    levels: int = 2
    low: tuple[int, int] = (1, 4)
    high: tuple[int, int] = (4, 8)
    distortion_weight: float = 1.0
    count_overhead: bool = True
    palette: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("noise_epochs", "finetune_epochs", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("lr", "weight_decay", "bits_lr", "range_lr", "distortion_weight"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        if self.finetune_lr is not None and (not np.isfinite(self.finetune_lr) or self.finetune_lr < 0):
            raise ValueError(f"finetune_lr must be finite and >= 0 or None, got {self.finetune_lr!r}")
        object.__setattr__(self, "low", tuple(self.low))
        object.__setattr__(self, "high", tuple(self.high))
        if self.palette is not None:
            object.__setattr__(self, "palette", tuple(self.palette))
        # the transform and the palette validate the rest; fail here, at construction
        noise_transform(self, pselect.everything())
        qp.choose_palette(np.array([4.0]), 1, levels=self.levels, low=self.low, high=self.high,
                          distortion_weight=self.distortion_weight, fixed=self.palette)


def noise_transform(cfg: QuantConfig, select: pselect.Selector | None = None):
    """The phase-1 transform of ``cfg`` (its ``init`` builds the starting latent)."""
    return qn.noise_injection(select, b_min=cfg.b_min, b_max=cfg.b_max, b_init=cfg.b_init,
                              granularity=cfg.granularity, learned_range=cfg.learned_range,
                              lmbda=cfg.lmbda, target_bits=cfg.target_bits,
                              budget_weight=cfg.budget_weight, budget_form=cfg.budget_form,
                              eval_mode=cfg.eval_mode)


def _weights_tx(lr: float, weight_decay: float):
    return optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)


def quant_optimizer(cfg: QuantConfig, phase: str = "noise") -> optax.GradientTransformation:
    """Role optimizer of a phase: weights Adam(W), widths Adam (phase 1 only; frozen in phase 2),
    learned clip Adam; no decay on anything but the weights."""
    if phase not in ("noise", "finetune"):
        raise ValueError(f"phase must be 'noise' or 'finetune', got {phase!r}")
    lr = cfg.lr if phase == "noise" or cfg.finetune_lr is None else cfg.finetune_lr
    roles = {"weights": _weights_tx(lr, cfg.weight_decay), "range": optax.adam(cfg.range_lr)}
    if phase == "noise":
        roles["bits"] = optax.adam(cfg.bits_lr)
    return role_optimizer(roles)


def _bits_metric(state, ctx) -> dict:
    return {"weight_bits": qn.average_bits(state.params)}


def assign(cfg: QuantConfig):
    """The transition into phase 2: ``state.params`` snapped to palettes (fresh optimizer follows)."""
    def enter(state, snapshots):
        del snapshots
        params = jax.tree.map(np.asarray, jax.device_get(state.params))
        return state.replace(params=qp.assign_palette(
            params, levels=cfg.levels, low=cfg.low, high=cfg.high,
            distortion_weight=cfg.distortion_weight, count_overhead=cfg.count_overhead,
            fixed=cfg.palette))
    return enter


def quant_phases(cfg: QuantConfig, select: pselect.Selector | None = None) -> list:
    """``[noise, finetune]`` (module doc). Keeps the snapshot ``"noise"`` (the end of phase 1).

    Rows carry ``weight_bits``: the average learned width (phase 1) or palette width (phase 2)."""
    from pae.train.engine import Phase   # imported here: the quantizer pieces need no engine
    t = noise_transform(cfg, select)

    def context(epoch):
        return Context.make(key=jax.random.PRNGKey(cfg.seed))

    noise = Phase("noise", cfg.noise_epochs, lambda spe: quant_optimizer(cfg, "noise"), t, context,
                  keep={cfg.noise_epochs: "noise"}, metrics=_bits_metric)
    finetune = Phase("finetune", cfg.finetune_epochs, lambda spe: quant_optimizer(cfg, "finetune"),
                     qn.palette_quantizer(), context, assign(cfg), metrics=_bits_metric)
    return [noise, finetune]


__all__ = ["QuantConfig", "assign", "noise_transform", "quant_optimizer", "quant_phases"]
