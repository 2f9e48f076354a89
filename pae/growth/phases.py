"""Incremental growth with variance transfer and LR adaptation as a list of engine phases.

``vt_phases(cfg, model, optimizer)`` gives one :class:`pae.train.Phase` per width stage: stage 0
trains ``model`` at ``cfg.start_fraction`` of its widths; stage ``t >= 1`` names the model of its
widths (``model=``), keeps the optimizer state and enters with :func:`pae.growth.grow` (pure and
deterministic: the key is ``fold_in(PRNGKey(cfg.seed), t)``), so a checkpoint's position is the
stage and a resumed run replays the growth steps before it. With ``cfg.lra`` the optimizer is
``optax.chain(optimizer(spe), scale_by_birth_stage(...))``, so the birth-stage map and the LR
scales live in the optimizer state and are checkpointed with it. Rows carry ``stage`` and
``params`` (the parameter count of the stage's model, for compute accounting).

Example (ResNet-20 on CIFAR-10, 9 stages from 1/4 width, 100 epochs in all)::

    cfg = VTConfig(first_epochs=8, epoch_schedule="fixed", total_epochs=100)
    sgd = lambda spe: optax.sgd(optax.cosine_decay_schedule(0.1, 100 * spe), 0.9)
    phases = vt_phases(cfg, GrowableResNet(20, 10), sgd)
    res = train_phases(task, phases, init_state(phases[0].model, task.example, 0), batch_size=128)

The optimizer state is kept across stages, so one schedule's step count runs over the whole run.

Reference: Yuan, Savarese, Maire, arXiv 2306.12700 (NeurIPS 2023).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pae.growth import lra as plra
from pae.growth import schedule as psched
from pae.growth import vt as pvt
from pae.train.engine import Phase


GROW_METHODS = ("pairs", "net2net", "gradmax")


@dataclasses.dataclass(frozen=True)
class VTConfig:
    """Growth hyperparameters (paper defaults: 1/4 width, +20% per step, 8 steps, exponential stage
    durations with the same 20%, T_0 = 8 on CIFAR-10).

    ``total_epochs``: the last (full-width) stage gets what the earlier stages leave (None: it lasts
    as the schedule says). ``vt``/``new_init``/``new_moments``: see :func:`pae.growth.grow`;
    ``lra_*``: see :mod:`pae.growth.lra`. ``width_multiple``: stage widths rounded to multiples of
    it (:func:`pae.growth.width_schedule`; 2, the paper's schedule). ``method``: how new units are
    made: ``"pairs"`` (the paper's function-preserving pairs, :func:`pae.growth.grow`, default), or
    the ablation's peers
    ``"net2net"`` (:func:`~pae.growth.vt.grow_net2net`, noise ``net2net_noise``; ``vt`` and
    ``new_init`` unused) and ``"gradmax"`` (:func:`~pae.growth.vt.grow_gradmax` with
    ``gradmax_scale``/``gradmax_fan_in``/``gradmax_depthwise``; needs
    ``vt_phases(..., gradient_batch=...)``). Depthwise convs (MobileNetV1) grow by the rule of each
    method (:mod:`pae.growth.vt`).
    """

    start_fraction: float = 0.25
    width_growth: float = 0.2
    growth_steps: int = 8
    width_multiple: int = 2
    first_epochs: int = 8
    epoch_growth: float = 0.2
    epoch_schedule: str = "exponential"
    total_epochs: int | None = None
    vt: str = "sqrt"
    new_init: str = "he"
    new_moments: str = "warm"
    lra: bool = True
    lra_norms: str = "layer"
    lra_recompute: str = "growth"
    lra_leaves: str = "kernels"
    seed: int = 0
    method: str = "pairs"
    net2net_noise: float = 0.01
    gradmax_scale: float = 0.5
    gradmax_fan_in: float = 0.01
    gradmax_depthwise: str = "identity"

    def __post_init__(self):
        for name, allowed in (("vt", pvt.VT_RULES), ("new_init", pvt.NEW_INITS),
                              ("new_moments", pvt.NEW_MOMENTS), ("lra_norms", plra.LRA_NORMS),
                              ("lra_recompute", plra.LRA_RECOMPUTE), ("lra_leaves", plra.LRA_LEAVES),
                              ("epoch_schedule", psched.EPOCH_SCHEDULES), ("method", GROW_METHODS),
                              ("gradmax_depthwise", pvt.GRADMAX_DEPTHWISE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"VTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        m = self.width_multiple
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2 or m % 2:
            raise ValueError(f"VTConfig.width_multiple must be an even int >= 2 (new units come in "
                             f"pairs), got {m!r}")
        psched.check_growth("VTConfig.epoch_growth", self.epoch_growth)
        t = self.total_epochs
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Integral)):
            raise TypeError(f"VTConfig.total_epochs must be an int or None, got {type(t).__name__} {t!r}")
        if self.growth_steps + 1 > 16:
            raise ValueError(f"VTConfig.growth_steps must be <= 15 (the LR adaptation tracks 16 "
                             f"stages), got {self.growth_steps}")

    def widths(self, final: dict) -> list[dict]:
        """The widths of every stage."""
        return psched.width_schedule(final, start_fraction=self.start_fraction,
                                     growth=self.width_growth, steps=self.growth_steps,
                                     multiple=self.width_multiple)

    def epochs(self) -> list[int]:
        """The epochs of every stage."""
        return psched.stage_epochs(self.growth_steps + 1, self.first_epochs, growth=self.epoch_growth,
                                   kind=self.epoch_schedule, total=self.total_epochs)


def stage_models(cfg: VTConfig, model) -> list:
    """``model`` at the widths of every stage (the last one is ``model``'s own widths)."""
    pvt.resolve_widths(model, model)          # checks that model is growable
    return [model.at_widths(w) for w in cfg.widths(model.groups())]


def gradient(model, state, batch):
    """The gradient of the mean cross-entropy of ``batch`` (``inputs``, ``targets``) with respect to
    ``state.params``, the model in train mode (batch statistics), as GradMax's growth needs it."""
    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["inputs"],
                                train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    return jax.device_get(jax.jit(jax.grad(loss))(state.params))


def vt_phases(cfg: VTConfig, model, optimizer: Callable[[int], optax.GradientTransformation],
              *, name: str = "stage", gradient_batch=None) -> list[Phase]:
    """One Phase per width stage of ``model`` (its full widths are the last stage's).

    ``optimizer``: ``steps_per_epoch -> optax.GradientTransformation`` for the whole run (a schedule
    over all stages is the caller's; the LR adaptation multiplies it per element). Start the run
    from ``init_state(phases[0].model, example, seed)``. Parallel runs (``runs=``) are not
    supported: the growth transition is host-side. ``gradient_batch``: ``{"inputs", "targets"}``
    (model-ready, e.g. normalized) on which ``cfg.method="gradmax"`` takes the loss gradient at
    every growth (a fixed batch, so the transition stays a pure function of the state).
    """
    if not isinstance(cfg, VTConfig):
        raise TypeError(f"cfg must be a VTConfig, got {type(cfg).__name__}")
    if not callable(optimizer):
        raise TypeError(f"optimizer must be a function steps_per_epoch -> optax.GradientTransformation, "
                        f"got {type(optimizer).__name__}")
    if cfg.method == "gradmax":
        if not (isinstance(gradient_batch, dict) and {"inputs", "targets"} <= set(gradient_batch)):
            raise ValueError("gradient_batch must be a dict with 'inputs' and 'targets' when "
                             f"cfg.method='gradmax', got {type(gradient_batch).__name__}")
        gradient_batch = {k: np.asarray(gradient_batch[k]) for k in ("inputs", "targets")}
    models = stage_models(cfg, model)
    epochs = cfg.epochs()
    lra = plra.scale_by_birth_stage(norms=cfg.lra_norms, recompute=cfg.lra_recompute,
                                    leaves=cfg.lra_leaves)

    def tx_of(spe):
        return optax.chain(optimizer(spe), lra) if cfg.lra else optimizer(spe)

    def enter_for(t):
        def enter(state, snapshots):
            del snapshots
            key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), t)
            if cfg.method == "net2net":
                return pvt.grow_net2net(state, models[t - 1], models[t], key, tx=tx_of(1),
                                        noise=cfg.net2net_noise, new_moments=cfg.new_moments)
            if cfg.method == "gradmax":
                jax.tree.map(np.asarray, state.params)    # a tracer fails here (engine replay)
                grads = gradient(models[t - 1], state, gradient_batch)
                return pvt.grow_gradmax(state, models[t - 1], models[t], key, grads, tx=tx_of(1),
                                        scale=cfg.gradmax_scale, fan_in=cfg.gradmax_fan_in,
                                        depthwise=cfg.gradmax_depthwise,
                                        new_moments=cfg.new_moments)
            return pvt.grow(state, models[t - 1], models[t], key,
                            tx=tx_of(1), vt=cfg.vt, new_init=cfg.new_init, new_moments=cfg.new_moments)
        return enter

    def metrics_for(t):
        def metrics(state, ctx):
            n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state.params))
            return {"stage": jnp.asarray(t, jnp.int32), "params": jnp.asarray(n, jnp.int32)}
        return metrics

    phases = []
    for t, (m, e) in enumerate(zip(models, epochs)):
        phases.append(Phase(f"{name}{t}", e, tx_of, model=m, metrics=metrics_for(t),
                            enter=None if t == 0 else enter_for(t),
                            optimizer_state="fresh" if t == 0 else "keep"))
    return phases


__all__ = ["GROW_METHODS", "VTConfig", "gradient", "stage_models", "vt_phases"]
