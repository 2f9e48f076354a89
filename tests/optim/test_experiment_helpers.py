"""The pure helpers of experiments/optimizers.py (no training here; the script is run by hand)."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def ex(load_script):
    return load_script("optimizers", "optim_experiment")  # dataclasses look their module up there


LRS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
EPSS = [1e-8, 1e-6, 1e-4, 1e-2, 1.0]


def test_decoupling_slope_is_zero_for_an_axis_aligned_region(ex):
    acc = np.full((5, 5), 0.1)
    acc[2, :] = 0.95  # best lr 1e-2 whatever eps
    out = ex.decoupling_slope(LRS, EPSS, acc, floor=0.5)
    assert out["columns"] == 5
    assert out["slope"] == pytest.approx(0.0, abs=1e-9)


def test_decoupling_slope_is_half_for_a_diagonal_in_these_units(ex):
    acc = np.full((5, 5), 0.1)
    for j in range(5):
        acc[j, j] = 0.9  # lr grows 10x per 100x eps
    out = ex.decoupling_slope(LRS, EPSS, acc, floor=0.5)
    assert out["slope"] == pytest.approx(0.5)


def test_decoupling_slope_ignores_columns_that_never_trained(ex):
    acc = np.full((5, 5), 0.1)
    acc[1, 0] = acc[1, 1] = 0.9  # two trained columns, same best lr; the rest at chance
    acc[4, 4] = 0.3  # below the floor: ignored even though its best lr differs
    out = ex.decoupling_slope(LRS, EPSS, acc, floor=0.5)
    assert out["columns"] == 2 and out["slope"] == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(ex.decoupling_slope(LRS, EPSS, np.full((5, 5), 0.1), floor=0.5)["slope"])


def test_grid_factories_take_injectable_hyperparameters(ex):
    import jax.numpy as jnp
    import optax

    for factory in ex.GRID_OPTIMIZERS.values():
        tx = optax.inject_hyperparams(factory)(learning_rate=1.0, eps=1.0, weight_decay=5e-4)
        state = tx.init(jnp.ones(3))
        assert set(state.hyperparams) >= {"learning_rate", "eps", "weight_decay"}


def test_run_engine_rejects_the_shared_only_model(ex):
    with pytest.raises(ValueError, match="small_cnn"):
        ex.run_one(ex.Setup(engine="run"), None, 0, "x")
