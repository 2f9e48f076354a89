"""Continuous Sparsification (Savarese, Silva & Maire, arXiv 1912.04427, NeurIPS 2020).

Each selected weight ``w`` gets a mask logit ``s`` (initialized to ``s_init``); during search the
model sees ``w * m`` with the soft mask and the loss gets ``lambda * sum(m)``::

    soft  m = sigmoid(beta * s) / sigmoid(s_init)        (scaled, the official code's default)
    hard  m = 1[s > 0] / sigmoid(s_init)                  (strict >: s == 0 is pruned)

``scaled=False`` drops the ``1/sigmoid(s_init)`` factor (``m = sigmoid(beta*s)``, ``1[s>0]``), the
paper's unscaled form. ``beta`` (inverse temperature) comes from ``ctx.beta`` as traced data and
follows :func:`temperature_schedule`; between rounds :func:`reset_logits` applies the paper's
``s <- min(beta_T * s, s_init)`` or the official code's ``s <- min(s, s_init)``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pae.core import Transform, check_finite, check_positive, map_nodes, nodes, select as pselect
from pae.sparsity.masks import FixedMask, SoftMask, _check_shape, _is_mask, _zip_masked, check_shapes

RESET_RULES = ("paper", "code")


def _scale(s_init, scaled: bool):
    return 1.0 / jax.nn.sigmoid(jnp.asarray(s_init, jnp.float32)) if scaled else 1.0


def soft_mask(logits: jax.Array, beta, s_init=0.0, scaled: bool = True) -> jax.Array:
    """``sigmoid(beta * s) / sigmoid(s_init)`` (or without the scale), in float32; ``beta`` > 0."""
    check_positive("beta", beta)
    logits = jnp.asarray(logits, jnp.float32)
    return jax.nn.sigmoid(jnp.asarray(beta, jnp.float32) * logits) * _scale(s_init, scaled)


def hard_mask(logits: jax.Array, s_init=0.0, scaled: bool = True) -> jax.Array:
    """``1[s > 0] / sigmoid(s_init)`` (or ``1[s > 0]``), in float32; strict ``>``."""
    return (jnp.asarray(logits) > 0).astype(jnp.float32) * _scale(s_init, scaled)


def _beta(ctx):
    if not hasattr(ctx, "beta"):
        raise TypeError(f"ctx must carry the inverse temperature beta (build it with "
                        f"pae.Context.make(beta=...)), got {type(ctx).__name__}")
    return ctx.beta


def continuous_sparsification(select: pselect.Selector | None = None, s_init: Any = 0.0,
                              lmbda: float = 1e-8, scaled: bool = True) -> Transform:
    """The CS transform: soft masks on the selected leaves, hard masks at ``finalize``.

    Args:
      select: which leaves get masks (default ``pae.select.kernels()``: every dense/conv kernel; the
        official ResNet-20 setting is ``pae.select.conv_kernels((3, 3))``).
      s_init: initial mask logit, the main sparsity knob (negative: sparser). Kept in every
        :class:`SoftMask` node (``node.s_init``), where the masks, :func:`reset_logits` and
        :func:`to_ticket` read it; :func:`with_s_init` changes it (one value per parallel run).
      lmbda: weight of ``sum(m)`` over all masked entries (official default 1e-8, on the *sum*).
      scaled: keep the official ``1/sigmoid(s_init)`` scale on soft and hard masks (kept in the nodes).

    ``ctx`` must have a ``beta`` attribute (``pae.Context``); ``beta`` > 0.
    """
    select = pselect.kernels() if select is None else select
    check_finite("s_init", s_init)
    check_finite("lmbda", lmbda)
    if not isinstance(lmbda, jax.core.Tracer) and float(lmbda) < 0:
        raise ValueError(f"lmbda must be >= 0, got {lmbda}")

    def init(params, key):
        del key

        def wrap(p, w):
            w = jnp.asarray(w)
            return SoftMask(w, jnp.full(w.shape, s_init, jnp.float32), jnp.asarray(s_init, jnp.float32),
                            scaled)

        return pselect.map_selected(params, select, wrap, what="select")

    def apply(latent, ctx):
        check_shapes(latent)
        beta = _beta(ctx)
        return map_nodes(lambda n: n.weight * soft_mask(n.logits, beta, n.s_init, n.scaled).astype(
            n.weight.dtype), latent, SoftMask)

    def penalty(latent, ctx):
        beta = _beta(ctx)
        total = jnp.zeros((), jnp.float32)
        for n in nodes(latent, SoftMask):
            total = total + jnp.sum(soft_mask(n.logits, beta, n.s_init, n.scaled))
        return lmbda * total

    def finalize(latent, ctx):
        del ctx
        return map_nodes(lambda n: n.weight * hard_mask(n.logits, n.s_init, n.scaled).astype(
            n.weight.dtype), latent, SoftMask)

    return Transform(init, apply, penalty, finalize)


def temperature_schedule(epoch: int, epochs: int, beta_final: float = 200.0) -> float:
    """``beta_e = beta_final ** (e / (E - 1))``: 1 at the first epoch of a round, ``beta_final`` at the last.

    Stepped per epoch (constant within one) and restarted every round, as the official code does.
    With ``epochs == 1`` the only epoch uses beta = 1 (the official code would divide by zero).
    """
    check_finite("beta_final", beta_final)
    if beta_final <= 0:
        raise ValueError(f"beta_final must be > 0, got {beta_final}")
    for name, v in (("epoch", epoch), ("epochs", epochs)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 <= int(epoch) < int(epochs):
        raise ValueError(f"epoch must be in [0, {epochs}), got {epoch}")
    if epochs == 1:
        return 1.0
    return float(beta_final) ** (int(epoch) / (int(epochs) - 1))


def with_s_init(latent: Any, s_init: Any) -> Any:
    """Every :class:`SoftMask` restarted at ``s_init``: logits filled with it and ``node.s_init`` set
    (the per-run ``setup`` of a parallel search; ``s_init`` may be traced)."""
    check_finite("s_init", s_init)
    s0 = jnp.asarray(s_init, jnp.float32)
    return map_nodes(lambda n: n.replace(logits=jnp.full_like(n.logits, s0), s_init=s0), latent, SoftMask)


def reset_logits(latent: Any, rule: str = "paper", beta_final: float = 200.0) -> Any:
    """Between-round reset of the mask logits, with each node's own ``s_init``.

    ``rule="paper"``: ``s <- min(beta_final * s, s_init)`` (the paper; kept entries return to s_init,
    removed ones are pushed far negative and stay removed). ``rule="code"``: ``s <- min(s, s_init)``
    (what the official script does: its ``main.py`` sets ``model.temp = 1`` before ``prune()``).
    """
    if rule not in RESET_RULES:
        raise ValueError(f"rule must be one of {RESET_RULES}, got {rule!r}")
    check_finite("beta_final", beta_final)
    factor = float(beta_final) if rule == "paper" else 1.0
    if rule == "paper" and factor <= 0:
        raise ValueError(f"beta_final must be > 0, got {beta_final}")
    return map_nodes(lambda n: n.replace(logits=jnp.minimum(
        factor * n.logits, jnp.asarray(n.s_init, jnp.float32))), latent, SoftMask)


def to_ticket(latent: Any, rewound: Any, binary: bool = False) -> Any:
    """The ticket's latent: every :class:`SoftMask` of ``latent`` becomes a :class:`FixedMask` with the
    hard mask of its logits (its own ``s_init``/``scaled``; ``binary``: always ``1[s > 0]``) and the
    weight of ``rewound`` (same tree; its SoftMask weights are used).
    """
    def ticket(path, now, old):
        if not isinstance(now, SoftMask):
            return old
        _check_shape(path, old.weight, now.logits)
        mask = hard_mask(now.logits, now.s_init, now.scaled and not binary)
        return FixedMask(old.weight, mask.astype(old.weight.dtype))

    return _zip_masked(ticket, latent, rewound, "rewound must have the same tree structure as latent")


def rewind(latent: Any, checkpoint: Any) -> Any:
    """Everything from ``checkpoint`` except the mask logits/masks, which stay as in ``latent``."""
    def take(path, now, old):
        node = _is_mask(now)
        shape_now, shape_old = (np.shape(now.weight), np.shape(old.weight)) if node else \
            (np.shape(now), np.shape(old))
        if shape_now != shape_old:
            raise ValueError(f"checkpoint leaf {path!r} has shape {shape_old} but the latent has {shape_now}")
        return now.replace(weight=old.weight) if node else old

    return _zip_masked(take, latent, checkpoint, "checkpoint must have the same tree structure as latent")
