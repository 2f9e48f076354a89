"""Iterative magnitude pruning (Frankle & Carbin, arXiv 1803.03635; with rewinding, arXiv 1912.05671).

Each round trains the masked network, then removes the ``rate`` fraction of the *remaining* weights
with the smallest magnitude: globally over all masked leaves (``scope="global"``) or separately in
each leaf (``scope="layer"``). After ``k`` rounds the density is about ``(1 - rate) ** k``.
"""
from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pae.core import select as pselect
from pae.sparsity.masks import FixedMask

SCOPES = ("global", "layer")


def with_unit_masks(params: Any, select: pselect.Selector | None = None) -> Any:
    """Wrap the selected leaves in :class:`FixedMask` nodes with all-ones masks (IMP round 0)."""
    select = pselect.kernels() if select is None else select
    return pselect.map_selected(params, select,
                                lambda p, w: FixedMask(w, jnp.ones(jnp.shape(w), jnp.asarray(w).dtype)),
                                what="select")


def _prune_flat(magnitudes: np.ndarray, keep: np.ndarray, rate: float) -> np.ndarray:
    """New keep-mask: the ``round(rate * kept)`` smallest kept magnitudes removed (stable order)."""
    alive = np.flatnonzero(keep)
    k = int(round(rate * alive.size))
    if k == 0:
        return keep.copy()
    order = alive[np.argsort(magnitudes[alive], kind="stable")]
    out = keep.copy()
    out[order[:k]] = False
    return out


def magnitude_prune(latent: Any, rate: float = 0.2, scope: str = "global") -> Any:
    """Remove the ``rate`` fraction of the remaining weights of smallest ``|w|`` from every FixedMask.

    Host-side (between rounds); masks are 0/1 in the weight's dtype.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(rate, bool) or not (isinstance(rate, numbers.Real) and 0.0 <= rate < 1.0):
        raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
    is_fm = lambda x: isinstance(x, FixedMask)  # noqa: E731
    flat, tree = jax.tree.flatten(latent, is_leaf=is_fm)
    idx = [i for i, x in enumerate(flat) if is_fm(x)]
    if not idx:
        raise ValueError("latent has no FixedMask node: nothing to prune")
    mags = [np.abs(np.asarray(flat[i].weight, np.float32)).ravel() for i in idx]
    keeps = [np.asarray(flat[i].mask).ravel() != 0 for i in idx]
    if scope == "global":
        new = _prune_flat(np.concatenate(mags), np.concatenate(keeps), rate)
        bounds = np.cumsum([0] + [m.size for m in mags])
        new_keeps = [new[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        new_keeps = [_prune_flat(m, k, rate) for m, k in zip(mags, keeps)]
    for i, keep in zip(idx, new_keeps):
        node = flat[i]
        flat[i] = node.replace(mask=jnp.asarray(keep.reshape(np.shape(node.mask)),
                                                 jnp.asarray(node.mask).dtype))
    return jax.tree.unflatten(tree, flat)


def rounds_for_density(target: float, rate: float = 0.2) -> int:
    """Smallest number of IMP rounds whose density ``(1-rate)**k`` is <= ``target``."""
    if not 0 < target <= 1:
        raise ValueError(f"target density must be in (0, 1], got {target}")
    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    return int(np.ceil(np.log(target) / np.log(1 - rate) - 1e-9))
