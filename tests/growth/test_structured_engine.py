"""Structured continuous sparsification on the engine: a tiny run grows from the seed and settles at
the budget; the extracted net computes the searched net's evaluation logits."""
import jax
import numpy as np
import pytest

from pae.core import Context
from pae.growth import extract as pe, flops as pf, structured as ps
from pae.models import CifarResNet
from pae.train import init_state, make_task, train_phases


@pytest.fixture(scope="module")
def run():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8, 8, 3)).astype(np.float32)
    y = (x[:, :4, :, 0].mean((1, 2)) > x[:, 4:, :, 1].mean((1, 2))).astype(np.int32)
    model = CifarResNet(14, 2, (4, 8, 8))
    spec = ps.gate_spec(model, x[:1])
    cfg = ps.StructuredConfig(epochs=12, lr=0.05, mask_lr=1.0, lmbda=20.0, beta_final=10.0, budget=0.5,
                              weight_decay=0.0)
    task = make_task(model, {"train": (x[:192], y[:192]), "test": (x[192:], y[192:])})
    state = init_state(model, x[:1], 0, cfg.transform(spec).init)
    seed = float(pf.cost(spec, *ps.hard_gates(state.params.logits)) / pf.full_cost(spec))
    out = train_phases(task, ps.structured_phases(cfg, spec), state, batch_size=64, log=lambda s: None)
    return spec, cfg, seed, out, x[192:]


def test_grows_from_the_seed_then_settles_at_the_budget(run):
    spec, cfg, seed, out, _ = run
    flops = np.array([r["flops"] for r in out.rows("search")])
    lam = np.array([r["lambda"] for r in out.rows("search")])
    assert seed < 0.1                                # 25% width, one block per stage
    assert lam[0] < 0                                # under budget: the penalty rewards growth
    assert flops.max() > 0.4 and np.argmax(flops > 0.4) > 0        # grew, not at the first epoch
    assert abs(flops[-1] - cfg.budget) < 0.1                        # settled near the budget ...
    assert np.ptp(flops[-4:]) < 0.05                                # ... and stays there
    np.testing.assert_allclose(lam, cfg.lmbda * (flops - cfg.budget), rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(r["train_loss"]) for r in out.history)
    train = np.array([r["train_flops"] for r in out.rows("search")])
    assert np.all((train > 0) & (train <= 1))


def test_extracted_net_equals_the_searched_net(run):
    spec, cfg, seed, out, x = run
    state = out.snapshots["searched"]
    t = cfg.transform(spec)
    gated = spec.model.apply({"params": t.apply(state.params, Context.make(beta=cfg.beta_final, train=False)),
                              "batch_stats": state.batch_stats}, x)
    ex = pe.extract(spec, state.params, state.batch_stats)
    np.testing.assert_allclose(ex.model.apply(ex.variables, x), gated, rtol=1e-4, atol=1e-4)
    # the extracted net's own FLOPs are the counted fraction of the full net's
    slim = ps.gate_spec(ex.model, x[:1])
    np.testing.assert_allclose(pf.full_cost(slim) / pf.full_cost(spec), out.last("search")["flops"],
                               rtol=1e-5)
    n = sum(np.size(v) for v in jax.tree.leaves(ex.variables["params"]))
    assert n < sum(np.size(v) for v in jax.tree.leaves(state.params.weights))
