"""Shared pieces of the growth tests: states with non-trivial BatchNorm, logits in both modes."""
import jax
import numpy as np
import pytest

from pae.train import init_state

def perturbed_state(model, x, seed=0):
    """``init_state`` with random BatchNorm affine parameters and running statistics and random
    biases, so that nothing the growth must carry is trivially 0 or 1."""
    state = init_state(model, x, seed)
    rng = np.random.default_rng(seed + 100)

    def perturb(path, leaf):
        name = path[-1].key
        leaf = np.asarray(leaf)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 2.0, leaf.shape).astype(leaf.dtype)
        if name in ("bias", "mean"):
            return rng.normal(0, 0.5, leaf.shape).astype(leaf.dtype)
        return leaf
    return state.replace(params=jax.tree_util.tree_map_with_path(perturb, state.params),
                         batch_stats=jax.tree_util.tree_map_with_path(perturb, state.batch_stats))


def logits(model, state, x, train):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if train:
        return np.asarray(model.apply(variables, x, train=True, mutable=["batch_stats"])[0])
    return np.asarray(model.apply(variables, x, train=False))


@pytest.fixture(scope="session")
def images():
    return np.random.default_rng(0).normal(size=(7, 8, 8, 3)).astype(np.float32)


@pytest.fixture(scope="session")
def g():
    """The helpers above, for the test modules (pytest's importlib mode cannot import conftest)."""
    import types
    return types.SimpleNamespace(perturbed_state=perturbed_state, logits=logits)
