"""The transform protocol: a reparameterization as four pure functions, and their composition."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from pae.core.context import Context


class Transform(NamedTuple):
    """A compression method as a reparameterization (cf. ``optax.GradientTransformation``).

    init(params, key) -> latent       the latent pytree built from ordinary params
    apply(latent, ctx) -> params      what the model sees this step (soft/noisy/mixed)
    penalty(latent, ctx) -> scalar    regularizer added to the loss
    finalize(latent, ctx) -> params   the hard, deployable parameters
    """

    init: Callable[[Any, jax.Array], Any]
    apply: Callable[[Any, Any], Any]
    penalty: Callable[[Any, Any], jax.Array]
    finalize: Callable[[Any, Any], Any]


def _zero(latent, ctx):
    return jnp.zeros((), jnp.float32)


def _params_as_latent(params, key):
    return params


def _latent_as_params(latent, ctx):
    return latent


def identity() -> Transform:
    """The transform that changes nothing (latent = params, zero penalty). Every call returns an equal
    transform (the same functions), so programs compiled for one are reused for another."""
    return Transform(init=_params_as_latent, apply=_latent_as_params, penalty=_zero,
                     finalize=_latent_as_params)


def _fold(ctx, i):
    return ctx.fold(i) if isinstance(ctx, Context) else ctx


def chain(*transforms: Transform) -> Transform:
    """Compose transforms; ``chain(t1, t2)`` means "t2 reparameterizes t1's latent".

    Order semantics (like function composition, outermost first)::

        init:     latent = t2.init(t1.init(params))      # t2 sees t1's latent (e.g. its weights)
        apply:    params = t1.apply(t2.apply(latent))    # undo the levels from the inside out
        penalty:  t2.penalty(latent) + t1.penalty(t2.apply(latent))   # each on its own level
        finalize: t1.finalize(t2.finalize(latent))

    So ``chain(sharing, sparsity, quantization)`` shares first, masks the shared weights, and quantizes
    the masked ones' weight field. Each level gets ``ctx`` with its key folded by its index.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, Transform):
            raise ValueError(f"chain argument {i} must be a pae.Transform, got {type(t).__name__}")
    if not transforms:
        return identity()

    def init(params, key):
        keys = jax.random.split(key, len(transforms))
        for t, k in zip(transforms, keys):
            params = t.init(params, k)
        return params

    def apply(latent, ctx):
        for i in reversed(range(len(transforms))):
            latent = transforms[i].apply(latent, _fold(ctx, i))
        return latent

    def penalty(latent, ctx):
        total = jnp.zeros((), jnp.float32)
        for i in reversed(range(len(transforms))):
            total = total + transforms[i].penalty(latent, _fold(ctx, i))
            if i:
                latent = transforms[i].apply(latent, _fold(ctx, i))
        return total

    def finalize(latent, ctx):
        for i in reversed(range(len(transforms))):
            latent = transforms[i].finalize(latent, _fold(ctx, i))
        return latent

    return Transform(init, apply, penalty, finalize)
