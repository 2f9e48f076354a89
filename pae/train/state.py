"""The train state: one pytree of arrays, so it can be jitted, sharded and checkpointed as a whole."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


@flax.struct.dataclass
class TrainState:
    """``params`` is what the optimizer updates: ordinary parameters, or a transform's latent pytree.

    ``batch_stats`` holds BatchNorm running statistics (``{}`` for models without BN); ``key`` is a
    raw ``uint32[2]`` PRNG key from which each step's dropout/noise keys are folded with ``step``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jax.Array


def _init(model: nn.Module, key: jax.Array, example_inputs: jax.Array) -> dict:
    return model.init({"params": key, "dropout": key}, example_inputs, train=False)


_jitted_init = jax.jit(_init, static_argnums=0)


def init_variables(model: nn.Module, example_inputs: jax.Array, key: jax.Array) -> dict:
    """``model.init`` as one compiled program (op by op, every initializer and layer of a new shape
    compiles a program of its own: several times slower on CPU), cached per (model, shapes); a model
    that is not hashable initializes op by op. A clear error when the inputs don't fit the model."""
    try:
        hash(model)
    except TypeError:
        init = _init
    else:
        init = _jitted_init
    try:
        return init(model, key, example_inputs)
    except Exception as err:  # shape errors surface as many types from deep inside flax/lax
        raise ValueError(
            f"{type(model).__name__} cannot take inputs of shape {tuple(example_inputs.shape)} "
            f"(dtype {example_inputs.dtype}): {err}") from err


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       example_inputs: jax.Array, seed: int,
                       init_latent: Callable[[Any, jax.Array], Any] | None = None) -> TrainState:
    """Initialize the model, optionally turn its params into a latent (``init_latent(params, key)``),
    and initialize the optimizer on what will be trained."""
    key = jax.random.PRNGKey(seed)
    init_key, latent_key, state_key = jax.random.split(key, 3)
    variables = init_variables(model, example_inputs, init_key)
    params = variables["params"]
    if init_latent is not None:
        params = init_latent(params, latent_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      key=state_key)
