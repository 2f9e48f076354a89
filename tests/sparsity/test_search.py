"""Ticket-search drivers: rewind point (incl. batch statistics), vmapped == sequential, IMP, tickets."""
import jax
import numpy as np
import pytest

from pae import sparsity as sp
from pae.core import Context, select as S
from pae.train import create_train_state, make_train_step
from pae.train import engine


CFG = sp.SearchConfig(rounds=2, epochs=3, rewind_epoch=2, batch_size=64, lr=0.1, milestones=(2,),
                      beta_final=20.0, lmbda=1e-4, seed=3)


def test_rewind_point_includes_batch_stats_and_ticket_uses_it(task):
    res = sp.cs_search(task, CFG, -0.02)
    # independent replay of the first `rewind_epoch` epochs of round 0
    tx = sp.cs_optimizer(CFG, 5)
    t = sp.continuous_sparsification(None, -0.02, CFG.lmbda, True)
    state = create_train_state(task.model, tx, task.example, CFG.seed, t.init)
    step = make_train_step(task.model, tx, reparam=t.apply, penalty=t.penalty)
    from pae.data import iterate_batches
    for e in range(CFG.rewind_epoch):
        ctx = Context.make(beta=CFG.beta_final ** (e / (CFG.epochs - 1)))
        for b in iterate_batches(task.train, 64, seed=CFG.seed, epoch=e, augment=task.train_transform):
            state, _ = step(state, b, ctx)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 res.rewind.params, jax.device_get(state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 res.rewind.batch_stats, jax.device_get(state.batch_stats))
    stats = res.rewind.batch_stats["BatchNorm_0"]
    assert np.abs(stats["mean"]).max() > 1e-3 and np.abs(stats["var"] - 1).max() > 1e-3  # moved
    # weights continue across rounds (not rewound between rounds); logits moved
    assert not np.allclose(res.searched["Conv_0"]["kernel"].weight,
                           res.rewind.params["Conv_0"]["kernel"].weight)
    ticket = sp.cs_ticket(res.searched, res.rewind.params, CFG)
    np.testing.assert_array_equal(ticket["Conv_0"]["kernel"].weight,
                                  res.rewind.params["Conv_0"]["kernel"].weight)
    np.testing.assert_allclose(ticket["Dense_0"]["kernel"].mask,
                               (res.searched["Dense_0"]["kernel"].logits > 0) / (1 / (1 + np.exp(0.02))),
                               rtol=1e-6)
    np.testing.assert_array_equal(ticket["Dense_0"]["bias"], res.rewind.params["Dense_0"]["bias"])
    assert 0 < float(res.densities) < 1 and len(res.history) == 2 and res.epochs == 6
    # the trained ticket is returned: its masks are the ticket's, its weights trained from the rewind
    trained = res.ticket.params
    np.testing.assert_array_equal(trained["Dense_0"]["kernel"].mask, ticket["Dense_0"]["kernel"].mask)
    assert not np.allclose(trained["Conv_0"]["kernel"].weight, ticket["Conv_0"]["kernel"].weight)
    assert res.ticket_row["density"] == pytest.approx(float(res.densities), abs=1e-6)


def test_vmapped_search_equals_sequential_per_s_init(task):
    s_inits = [-0.03, 0.05]
    par = sp.cs_search(task, CFG, s_inits)
    for i, s0 in enumerate(s_inits):
        seq = sp.cs_search(task, CFG, s0)
        take = lambda tree: jax.tree.map(lambda x: np.asarray(x)[i], tree)  # noqa: E731
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4),
                     take(par.searched), seq.searched)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4),
                     take(par.rewind.batch_stats), seq.rewind.batch_stats)
        assert float(take(par.searched)["Conv_0"]["kernel"].s_init) == pytest.approx(s0)
        n = sp.masked_count(seq.searched)
        assert abs(float(par.densities[i]) - float(seq.densities)) * n <= 2
        for r in range(CFG.rounds):
            assert par.history[r]["density"][i] == pytest.approx(seq.history[r]["density"], abs=2 / n)
        assert abs(par.ticket_row["test_acc"][i] - seq.ticket_row["test_acc"]) <= 2 / 160
    assert par.densities[0] < par.densities[1]  # lower s_init -> sparser


def test_dense_cs_and_imp_start_from_the_same_weights(task, monkeypatch):
    cfg = sp.SearchConfig(rounds=1, epochs=1, rewind_epoch=0, batch_size=64, milestones=(), seed=5)
    first = []
    real = engine.train_phases

    def spy(task, phases, state, **kwargs):
        first.append(jax.tree.map(np.asarray, jax.device_get(state.params)))
        return real(task, phases, state, **kwargs)

    monkeypatch.setattr(sp.search, "train_phases", spy)
    sp.train_dense(task, cfg)
    sp.cs_search(task, cfg, 0.0)
    sp.imp_search(task, cfg, levels=0)
    dense, cs, imp = first
    for name in ("Conv_0", "Dense_0"):
        np.testing.assert_array_equal(cs[name]["kernel"].weight, dense[name]["kernel"])
        np.testing.assert_array_equal(imp[name]["kernel"].weight, dense[name]["kernel"])
    np.testing.assert_array_equal(imp["Dense_0"]["bias"], dense["Dense_0"]["bias"])


def test_imp_random_reinit_and_dense_drivers(task):
    cfg = sp.SearchConfig(rounds=1, epochs=2, rewind_epoch=1, batch_size=64, lr=0.1, milestones=(),
                          seed=1)
    rows = sp.imp_search(task, cfg, levels=2, select=S.kernels())
    np.testing.assert_allclose([r["density"] for r in rows], [1.0, 0.8, 0.64], atol=1e-4)
    assert [r["epochs"] for r in rows] == [2, 4, 6]
    assert all(r["test_acc"] > 0.3 for r in rows)  # chance is 0.1
    dense = sp.train_dense(task, cfg)
    assert dense["test_acc"] > 0.3 and dense["epochs"] == 2
    # IMP's level 0 is dense training from the same initial weights (a paired baseline)
    assert rows[0]["test_acc"] == dense["test_acc"]
    res = sp.cs_search(task, cfg, 0.0)
    ticket = res.ticket.params
    fresh, stats = sp.random_reinit(task, ticket, seed=99)
    for a, b in zip(sp.mask_tree(ticket).values(), sp.mask_tree(fresh).values()):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(fresh["Conv_0"]["kernel"].weight, ticket["Conv_0"]["kernel"].weight)
    state, out = sp.train_ticket(task, cfg, fresh, stats)
    assert out["density"] == pytest.approx(float(res.densities), abs=1e-6)
    for a, b in zip(sp.mask_tree(ticket).values(), sp.mask_tree(state.params).values()):
        np.testing.assert_array_equal(a, b)   # masks stay frozen in training
