"""Jitted train and eval steps.

The loss is ``mean_mask(cross_entropy(model(reparam(latent, ctx)), targets)) + penalty(latent, ctx)``.
``ctx`` is a pytree of *traced* values (temperature, noise keys, flags as arrays) passed each call, so
changing it never recompiles. ``reparam`` and ``penalty`` default to the identity and zero; a
compression transform plugs in its ``apply`` and ``penalty`` here.

Metrics come back as sums (``loss_sum``, ``correct``, ``count``) weighted by the batch ``mask``, so
they add up exactly across batches, padded last batches and devices.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from pae.core import Context
from pae.train.state import TrainState

Reparam = Callable[[Any, Any], Any]
Penalty = Callable[[Any, Any], jax.Array]


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean softmax cross-entropy over real examples (and every token of a sequence) + metric sums.

    ``logits [B, ..., C]``, ``targets [B, ...]`` int, ``mask [B]`` (1 real, 0 padding).
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (losses.ndim - 1)), losses.shape)
    count = weights.sum()
    loss_sum = (losses * weights).sum()
    correct = ((logits.argmax(-1) == targets) * weights).sum()
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct,
                                                "count": count}


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    reparam: Reparam | None = None, penalty: Penalty | None = None,
                    donate: bool = True, pass_mask: bool = False, jit: bool = True) -> Callable:
    """Return ``train_step(state, batch, ctx) -> (state, metrics)``, jitted (state donated) unless
    ``jit=False``.

    Metrics include ``penalty`` (the regularizer's value) beside the sums of
    :func:`masked_cross_entropy`. A :class:`pae.Context` is specialized to the step: its ``key`` is
    folded with ``state.step`` and its ``step`` set, so a transform's noise differs every step.
    ``pass_mask``: call the model with ``mask=batch["mask"]`` (models whose BatchNorm ignores the
    padded rows of the last batch take it).
    """

    def train_step(state: TrainState, batch: dict, ctx: Any):
        dropout_key = jax.random.fold_in(state.key, state.step)
        if isinstance(ctx, Context):
            ctx = ctx.replace(key=jax.random.fold_in(ctx.key, state.step), step=state.step)
        extra = {"mask": batch["mask"]} if pass_mask else {}

        def loss_fn(latent):
            params = latent if reparam is None else reparam(latent, ctx)
            logits, updates = model.apply(
                _variables(params, state.batch_stats), batch["inputs"], train=True,
                mutable=["batch_stats"], rngs={"dropout": dropout_key}, **extra)
            loss, metrics = masked_cross_entropy(logits, batch["targets"], batch["mask"])
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
