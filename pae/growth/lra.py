"""Learning-rate adaptation (LRA) of Yuan, Savarese & Maire (arXiv 2306.12700), element-wise.

A grown network is a union of subnetworks by birth stage, ``W = W_0 u W_d1 u ... u W_dT``; the
subnetwork born at stage ``t`` trains with ``lr_t = lr_0 * ||W_dt||_F / ||W_0||_F`` (later
subnetworks have trained for fewer epochs). New units are slices of the same kernels as old ones,
so the multiplier is a per-element tree, read from a per-element ``birth`` map (int, the stage at
which each element was born) kept in this transformation's state. :func:`pae.growth.grow` extends
``birth`` (new elements get the new stage) and marks the scales stale.

Choices the paper leaves open (sharing_and_growth.md section 2.4), as named options:

* ``norms="layer"`` (default): ``||W_dt||`` and ``||W_0||`` are taken per leaf (per layer's kernel);
  ``"global"``: summed over every adapted leaf of the network (one ratio per stage).
* ``recompute="growth"`` (default): the scales are computed from the parameters at the first update
  after each growth (that is, from the grown, rescaled weights) and then frozen until the next
  growth; ``"step"``: recomputed from the current parameters at every update.
* ``leaves="kernels"`` (default): leaves with ``ndim >= 2`` are adapted, biases and BatchNorm
  parameters keep ``lr_0``; ``"all"``: every leaf. A depthwise kernel ``(kh, kw, 1, C)``
  (MobileNetV1) is a kernel like any other: a new channel's filter is born at the stage its channel
  is, and ``||W_dt||`` of that leaf is the norm of the filters born at ``t``.

The norms are the raw Frobenius norms, as in the paper's formula (no per-element normalization), so
a subnetwork with more elements than ``W_0`` gets a larger multiplier. A stage with ``||W_0|| = 0``
(or absent) gets multiplier 1. ``W_0`` keeps training, and when its norm grows the multipliers fall
below 1, so the formula read literally can slow late units down rather than catch them up
(``experiments/grow_vt.py`` records them per stage; README, growth).

Chain it last (after momentum/Adam, weight decay and the schedule), as a per-parameter-group
learning rate: ``optax.chain(optax.sgd(lr, 0.9), scale_by_birth_stage())``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

LRA_NORMS = ("layer", "global")
LRA_RECOMPUTE = ("growth", "step")
LRA_LEAVES = ("kernels", "all")


@struct.dataclass
class BirthState:
    """``stage``: growth steps so far (int32 scalar); ``stale``: recompute the scales at the next
    update (bool scalar); ``birth``: per element, the stage it was born at (int32, params-shaped);
    ``scale``: per element, ``lr_t / lr_0`` of its subnetwork (float32, params-shaped);
    ``max_stages``: the stages tracked (static, not a leaf; :func:`pae.growth.grow` refuses to grow
    past them)."""

    stage: jax.Array
    stale: jax.Array
    birth: Any
    scale: Any
    max_stages: int = struct.field(pytree_node=False, default=16)


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _adapted(leaf, leaves: str) -> bool:
    return leaves == "all" or jnp.ndim(leaf) >= 2


def birth_scales(params, birth, *, norms: str = "layer", leaves: str = "kernels",
                 max_stages: int = 16):
    """The per-element multiplier tree ``||W_dt||_F / ||W_0||_F`` (t = each element's birth stage).

    Traceable; ``max_stages`` bounds the stage index (a static segment count).
    """
    _check("norms", norms, LRA_NORMS)
    _check("leaves", leaves, LRA_LEAVES)
    p_leaves, treedef = jax.tree.flatten(params)
    b_leaves = treedef.flatten_up_to(birth)
    sq = [jax.ops.segment_sum(jnp.square(p.astype(jnp.float32)).ravel(), b.ravel().astype(jnp.int32),
                              num_segments=max_stages) if _adapted(p, leaves) else None
          for p, b in zip(p_leaves, b_leaves)]
    if norms == "global":
        total = sum(s for s in sq if s is not None)
        sq = [None if s is None else total for s in sq]
    out = []
    for p, b, s in zip(p_leaves, b_leaves, sq):
        if s is None:
            out.append(jnp.ones(jnp.shape(p), jnp.float32))
            continue
        ratio = jnp.where(s[0] > 0, jnp.sqrt(s / jnp.where(s[0] > 0, s[0], 1.0)), 1.0)
        out.append(ratio[b.astype(jnp.int32)])
    return treedef.unflatten(out)


def scale_by_birth_stage(*, norms: str = "layer", recompute: str = "growth", leaves: str = "kernels",
                         max_stages: int = 16) -> optax.GradientTransformation:
    """Multiply each update element by ``lr_t / lr_0 = ||W_dt||_F / ||W_0||_F`` of its birth stage.

    See the module doc for ``norms``, ``recompute`` and ``leaves``. Needs ``params`` in ``update``
    (pae's train step passes them). Before any growth every element is stage 0 and the multiplier
    is 1, so the transformation changes nothing.
    """
    _check("norms", norms, LRA_NORMS)
    _check("recompute", recompute, LRA_RECOMPUTE)
    _check("leaves", leaves, LRA_LEAVES)
    if not isinstance(max_stages, int) or max_stages < 1:
        raise ValueError(f"max_stages must be an int >= 1, got {max_stages!r}")

    def init(params):
        return BirthState(stage=jnp.zeros((), jnp.int32), stale=jnp.zeros((), jnp.bool_),
                          birth=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.int32), params),
                          scale=jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.float32), params),
                          max_stages=max_stages)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_birth_stage needs params in update(updates, state, params)")
        fresh = birth_scales(params, state.birth, norms=norms, leaves=leaves, max_stages=max_stages)
        if recompute == "step":
            scale = fresh
        else:
            scale = jax.tree.map(lambda f, s: jnp.where(state.stale, f, s), fresh, state.scale)
        updates = jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scale)
        return updates, state.replace(stale=jnp.zeros((), jnp.bool_), scale=scale)

    return optax.GradientTransformation(init, update)


__all__ = ["BirthState", "LRA_LEAVES", "LRA_NORMS", "LRA_RECOMPUTE", "birth_scales",
           "scale_by_birth_stage"]
