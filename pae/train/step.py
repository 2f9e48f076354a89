"""Jitted train and eval steps.

The loss is ``mean_mask(cross_entropy(model(reparam(latent, ctx)), targets)) + penalty(latent, ctx)``;
with a :class:`Distill` the cross-entropy is mixed with a distillation term towards a frozen
teacher's predictions (:func:`distillation_loss`).
``ctx`` is a pytree of *traced* values (temperature, noise keys, flags as arrays) passed each call, so
changing it never recompiles. ``reparam`` and ``penalty`` default to the identity and zero; a
compression transform plugs in its ``apply`` and ``penalty`` here.

Metrics come back as sums (``loss_sum``, ``correct``, ``count``) weighted by the batch ``mask``, so
they add up exactly across batches, padded last batches and devices.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from pae.core import Context
from pae.train.state import TrainState

Reparam = Callable[[Any, Any], Any]
Penalty = Callable[[Any, Any], jax.Array]


def _example_weights(mask: jax.Array, shape: tuple) -> jax.Array:
    """``mask [B]`` broadcast over the per-token axes of a loss of ``shape [B, ...]``."""
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - 1)), shape)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean softmax cross-entropy over real examples (and every token of a sequence) + metric sums.

    ``logits [B, ..., C]``, ``targets [B, ...]`` int, ``mask [B]`` (1 real, 0 padding).
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = _example_weights(mask, losses.shape)
    count = weights.sum()
    loss_sum = (losses * weights).sum()
    correct = ((logits.argmax(-1) == targets) * weights).sum()
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct,
                                                "count": count}


@dataclasses.dataclass(frozen=True, eq=False)
class Distill:
    """Knowledge distillation from a frozen teacher (Hinton et al., 2015), e.g. a float model
    guiding its own quantization-aware fine-tuning:

        loss = (1 - weight) * CE(s, y) + weight * T^2 * KL(softmax(t / T) || softmax(s / T))

    averaged over the real examples (and tokens), ``s``/``t`` the student's and teacher's logits.
    ``teacher``: the name of a snapshot kept by an earlier phase (or this phase's ``keep={0: ...}``),
    or a state holding ``params`` (and ``batch_stats``), e.g. a loaded checkpoint's. The teacher runs
    ``model`` (default the task's) in inference mode (BatchNorm statistics, no dropout), outside the
    gradient. ``weight`` in [0, 1]; ``temperature`` > 0.
    """

    teacher: Any
    weight: float = 1.0
    temperature: float = 1.0
    model: Any = None

    def __post_init__(self):
        if not (isinstance(self.teacher, str) or hasattr(self.teacher, "params")
                or (isinstance(self.teacher, Mapping) and "params" in self.teacher)):
            raise TypeError(f"Distill teacher must be a snapshot name (str), a state with .params or a "
                            f"mapping with 'params', got {type(self.teacher).__name__}")
        for name, ok, allowed in (("weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
                                  ("temperature", lambda v: 0 < v < float("inf"), "> 0 and finite")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"Distill {name} must be a number {allowed}, got {type(v).__name__}")
            if not ok(float(v)):
                raise ValueError(f"Distill {name} must be {allowed}, got {v!r}")

    def variables(self, snapshots: Any = None) -> dict:
        """``{"params", "batch_stats"}`` of the teacher (a kept snapshot looked up in ``snapshots``)."""
        state = snapshots[self.teacher] if isinstance(self.teacher, str) else self.teacher
        if isinstance(state, Mapping):
            return {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
        return {"params": state.params, "batch_stats": getattr(state, "batch_stats", None) or {}}


def distillation_loss(logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array,
                      mask: jax.Array, weight: float, temperature: float
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:class:`Distill`'s loss, and :func:`masked_cross_entropy`'s metric sums of the plain
    cross-entropy (rows stay comparable with undistilled runs)."""
    ce, sums = masked_cross_entropy(logits, targets, mask)
    t = temperature
    student = jax.nn.log_softmax(logits.astype(jnp.float32) / t)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t)
    kl = (jnp.exp(teacher) * (teacher - student)).sum(-1)
    kl = (kl * _example_weights(mask, kl.shape)).sum() / jnp.maximum(sums["count"], 1.0)
    return (1 - weight) * ce + weight * t * t * kl, sums


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    reparam: Reparam | None = None, penalty: Penalty | None = None,
                    donate: bool = True, pass_mask: bool = False, jit: bool = True,
                    distill: Distill | None = None) -> Callable:
    """Return ``train_step(state, batch, ctx) -> (state, metrics)``, jitted (state donated) unless
    ``jit=False``; with ``distill``, ``train_step(state, batch, ctx, teacher)``, ``teacher`` the
    teacher's variables (:meth:`Distill.variables`), passed each call (not compiled in).

    Metrics include ``penalty`` (the regularizer's value) beside the sums of
    :func:`masked_cross_entropy`. A :class:`pae.Context` is specialized to the step: its ``key`` is
    folded with ``state.step`` and its ``step`` set, so a transform's noise differs every step.
    ``pass_mask``: call the model with ``mask=batch["mask"]`` (models whose BatchNorm ignores the
    padded rows of the last batch take it).
    """

    if distill is not None and not isinstance(distill, Distill):
        raise TypeError(f"distill must be a pae.train.Distill or None, got {type(distill).__name__}")
    teacher_model = None if distill is None else (distill.model or model)

    def train_step(state: TrainState, batch: dict, ctx: Any, teacher: Any = None):
        if (teacher is None) != (distill is None):
            raise TypeError("train_step takes the teacher's variables exactly when built with distill")
        dropout_key = jax.random.fold_in(state.key, state.step)
        if isinstance(ctx, Context):
            ctx = ctx.replace(key=jax.random.fold_in(ctx.key, state.step), step=state.step)
        extra = {"mask": batch["mask"]} if pass_mask else {}
        if distill is not None:
            teacher_logits = teacher_model.apply(   # (no gradient: distillation_loss stops it)
                _variables(teacher["params"], teacher["batch_stats"]), batch["inputs"], train=False)

        def loss_fn(latent):
            params = latent if reparam is None else reparam(latent, ctx)
            logits, updates = model.apply(
                _variables(params, state.batch_stats), batch["inputs"], train=True,
                mutable=["batch_stats"], rngs={"dropout": dropout_key}, **extra)
            if distill is None:
                loss, metrics = masked_cross_entropy(logits, batch["targets"], batch["mask"])
            else:
                loss, metrics = distillation_loss(logits, teacher_logits, batch["targets"],
                                                  batch["mask"], distill.weight, distill.temperature)
            reg = jnp.zeros((), jnp.float32) if penalty is None else penalty(latent, ctx)
            return loss + reg, (metrics | {"penalty": reg}, updates.get("batch_stats", {}))

        grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
        return state, metrics

    if not jit:
        return train_step
    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_eval_step(model: nn.Module, *, reparam: Reparam | None = None, jit: bool = True) -> Callable:
    """Return ``eval_step(state, batch, ctx) -> metric sums`` (BN in inference mode; a
    :class:`pae.Context` gets ``train=False``), jitted unless ``jit=False``."""

    def eval_step(state: TrainState, batch: dict, ctx: Any):
        if isinstance(ctx, Context):
            ctx = ctx.replace(train=jnp.zeros((), jnp.bool_))
        params = state.params if reparam is None else reparam(state.params, ctx)
        logits = model.apply(_variables(params, state.batch_stats), batch["inputs"], train=False)
        return masked_cross_entropy(logits, batch["targets"], batch["mask"])[1]

    return jax.jit(eval_step) if jit else eval_step
