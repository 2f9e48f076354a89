"""Mask latent nodes shared by Continuous Sparsification and magnitude pruning, and their algebra."""
from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pae.core import Transform, latent_node, map_nodes, nodes, select as pselect
from pae.core.select import leaf_paths


@latent_node({"weight": "weights", "logits": "mask", "s_init": "frozen"})
class SoftMask:
    """A weight and its mask logits ``s`` (same shape, float32); the model sees ``weight * m(s)``.

    ``s_init`` (a float32 scalar, never trained) and ``scaled`` (static) are the search's settings,
    kept in the node so that every function reading them (the soft and hard masks, the between-round
    reset, the ticket) takes them from one place and a parallel search keeps one ``s_init`` per run.
    """

    weight: Any
    logits: Any
    s_init: Any = 0.0
    scaled: bool = flax.struct.field(pytree_node=False, default=True)


@latent_node({"weight": "weights", "mask": "frozen"})
class FixedMask:
    """A weight and a fixed (never trained) mask; the model sees ``weight * mask``."""

    weight: Any
    mask: Any


def _check_shape(path: str, weight, mask) -> None:
    if tuple(np.shape(weight)) != tuple(np.shape(mask)):
        raise ValueError(f"mask for {path!r} has shape {tuple(np.shape(mask))} but the parameter has "
                         f"shape {tuple(np.shape(weight))}; they must be equal")


def _is_mask(x) -> bool:
    return isinstance(x, (SoftMask, FixedMask))


def _zip_masked(fn, latent: Any, other: Any, mismatch: str) -> Any:
    """``fn(path, node_or_leaf, other's)`` over two trees of the same structure (mask nodes whole);
    ``mismatch`` is the ValueError message when the structures differ."""
    flat, tree = jax.tree_util.tree_flatten_with_path(latent, is_leaf=_is_mask)
    flat_other, tree_other = jax.tree.flatten(other, is_leaf=_is_mask)
    if tree != tree_other:
        raise ValueError(mismatch)
    return jax.tree.unflatten(tree, [fn(pselect.path_str(kp), now, old)
                                     for (kp, now), old in zip(flat, flat_other)])


def check_shapes(latent: Any) -> None:
    """ValueError naming the first mask node whose weight and mask (or logits) shapes differ."""
    for kp, node in jax.tree_util.tree_flatten_with_path(latent, is_leaf=_is_mask)[0]:
        if _is_mask(node):
            _check_shape(pselect.path_str(kp), node.weight,
                         node.logits if isinstance(node, SoftMask) else node.mask)


def attach_masks(params: Any, masks: Mapping[str, Any]) -> Any:
    """Wrap the leaves named by ``masks`` (path -> array, paths as in :mod:`pae.core.select`) in
    :class:`FixedMask` nodes. Unknown paths or shape mismatches raise ValueError."""
    masks = dict(masks)
    available = set(leaf_paths(params))
    unknown = sorted(set(masks) - available)
    if unknown:
        raise ValueError(f"masks names path(s) {unknown} that are not in params; available: "
                         f"{sorted(available)[:12]}")

    def wrap(p, w):
        _check_shape(p, w, masks[p])
        return FixedMask(w, jnp.asarray(masks[p], jnp.asarray(w).dtype))

    return pselect.map_selected(params, pselect.Selector(lambda p, x: p in masks, "masks"), wrap,
                                what="masks")


def mask_tree(latent: Any) -> dict[str, jax.Array]:
    """``{path: mask array}`` of the :class:`FixedMask` nodes of ``latent``."""
    out = {}
    for kp, node in jax.tree_util.tree_flatten_with_path(
            latent, is_leaf=_is_mask)[0]:
        if isinstance(node, FixedMask):
            out[pselect.path_str(kp)] = node.mask
    return out


def masked_params(latent: Any) -> Any:
    """Ordinary params: every :class:`FixedMask` replaced by ``weight * mask`` (shapes must match)."""
    check_shapes(latent)
    return map_nodes(lambda n: n.weight * n.mask.astype(n.weight.dtype), latent, FixedMask)


def fixed_masks() -> Transform:
    """The transform of a fixed mask (a ticket being trained, an IMP round): apply = weight * mask.

    ``init`` expects a latent that already holds :class:`FixedMask` nodes (see :func:`attach_masks`).
    """
    return Transform(init=lambda latent, key: latent,
                     apply=lambda latent, ctx: masked_params(latent),
                     penalty=lambda latent, ctx: jnp.zeros((), jnp.float32),
                     finalize=lambda latent, ctx: masked_params(latent))


def density(latent: Any) -> jax.Array:
    """Fraction of masked entries that are kept, over all mask nodes together.

    :class:`SoftMask`: ``mean(s > 0)`` (the hard mask; never float zeros of the sigmoid);
    :class:`FixedMask`: ``mean(mask != 0)``. Unmasked leaves are not counted.
    """
    kept, total = jnp.zeros((), jnp.float32), 0
    for node in nodes(latent, (SoftMask, FixedMask)):
        on = node.logits > 0 if isinstance(node, SoftMask) else node.mask != 0
        kept = kept + jnp.sum(on, dtype=jnp.float32)
        total += on.size
    if total == 0:
        raise ValueError("latent has no SoftMask or FixedMask node: nothing is masked")
    # the barrier keeps XLA from turning the division by a constant into a reciprocal product, so
    # the value is the correctly rounded quotient, jitted or not
    return kept / jax.lax.optimization_barrier(jnp.float32(total))


def layer_densities(latent: Any) -> dict[str, float]:
    """``{path: density}`` per masked leaf (host values)."""
    out = {}
    for kp, node in jax.tree_util.tree_flatten_with_path(
            latent, is_leaf=_is_mask)[0]:
        if isinstance(node, SoftMask):
            out[pselect.path_str(kp)] = float(jnp.mean(node.logits > 0))
        elif isinstance(node, FixedMask):
            out[pselect.path_str(kp)] = float(jnp.mean(node.mask != 0))
    return out


def masked_count(latent: Any) -> int:
    """Number of masked entries (the denominator of :func:`density`)."""
    return int(sum(np.size(n.weight) for n in nodes(latent, (SoftMask, FixedMask))))
