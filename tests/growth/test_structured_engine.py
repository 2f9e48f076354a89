"""Structured continuous sparsification on the engine: a tiny run grows from the seed and settles at
the budget; the extracted net computes the searched net's evaluation logits."""
import math

import jax
import numpy as np
import pytest

from pae.core import Context
from pae.growth import extraction as pe, flops as pf, structured as ps
from pae.models import CifarResNet
from pae.train import init_state, make_task, train_phases


def _toy(seed: int, depth: int):
    """96 random 8x8x3 images, a label from their left half, a 2-class CifarResNet of ``depth``
    (widths 4, 8, 8): 64 for training, 32 for testing."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(96, 8, 8, 3)).astype(np.float32)
    y = (x[:, :4, :, 0].mean((1, 2)) > 0).astype(np.int32)
    model = CifarResNet(depth, 2, (4, 8, 8))
    task = make_task(model, {"train": (x[:64], y[:64]), "test": (x[64:], y[64:])})
    return x, model, ps.gate_spec(model, x[:1]), task


@pytest.fixture(scope="module")
def run():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8, 8, 3)).astype(np.float32)
    y = (x[:, :4, :, 0].mean((1, 2)) > x[:, 4:, :, 1].mean((1, 2))).astype(np.int32)
    model = CifarResNet(14, 2, (4, 8, 8))
    spec = ps.gate_spec(model, x[:1])
    cfg = ps.StructuredConfig(epochs=12, lr=0.05, mask_lr=0.5, lmbda=20.0, beta_final=10.0, budget=0.5,
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


@pytest.mark.parametrize("carry", [True, False])
def test_compaction_then_training_equals_masked_full_size_training(carry):
    """Search 2 epochs full size, compact to fixed widths (active channels plus margin), search 2
    more on the slim net == the same 4 epochs full size with the dropped channels held off; with
    ``carry`` the optimizer state (Nesterov momentum of weights and logits, the step count) goes on
    in both, sliced to the kept channels by the compaction; without it both restart it."""
    from pae.train import Phase
    x, model, spec, task = _toy(1, 8)
    cfg = ps.StructuredConfig(epochs=4, lr=0.05, mask_lr=0.5, lmbda=5.0, beta_final=4.0, budget=0.5,
                              weight_decay=1e-3, seed_width=0.5)
    widths = {"stream0": 3, "stream1": 5, "BasicBlock_0/Conv_0": 2, "BasicBlock_1/Conv_0": 6}
    state = init_state(model, x[:1], 0, cfg.transform(spec).init)
    compacted = ps.structured_phases(cfg, spec, compactions=[(2, widths)], carry_optimizer=carry)
    assert [p.name for p in compacted] == ["search", "search1"] and compacted[1].model != model
    a = train_phases(task, compacted, state, batch_size=32, log=lambda s: None)

    # the oracle: full size; at epoch 2 the channels compaction drops get logit -1e4 (never drawn,
    # zero gradient), the optimizer state kept (carry) or fresh continuing the schedule, as the
    # compacted phase has
    kept = {}

    def hold_off(st, snaps):
        ch = {}
        for g, s in st.params.logits["channels"].items():
            s = np.asarray(s)
            if g in widths:
                order = sorted(range(len(s)), key=lambda i: (-s[i], i))[:widths[g]]
                kept[g] = np.array(sorted(order))
                s = np.where(np.isin(np.arange(len(s)), kept[g]), s, -1e4).astype(np.float32)
            ch[g] = s
        st = st.replace(params=st.params.replace(logits={**st.params.logits, "channels": ch}))
        return st if carry else st.replace(opt_state=None)

    full = ps.structured_phases(cfg, spec)[0]
    t = full.transform
    oracle = [Phase("search", 2, compacted[0].optimizer, t, full.context, eval_every=1,
                    metrics=full.metrics),
              Phase("search1", 2, compacted[1].optimizer, t, compacted[1].context, hold_off,
                    eval_every=1, metrics=full.metrics, optimizer_state=compacted[1].optimizer_state)]
    assert compacted[1].optimizer_state == ("keep" if carry else "fresh")
    b = train_phases(task, oracle, state, batch_size=32, log=lambda s: None)
    for ra, rb in zip(a.history, b.history):
        np.testing.assert_allclose(ra["train_loss"], rb["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(ra["test_loss"], rb["test_loss"], rtol=1e-4)
    la, lb = a.state.params, b.state.params
    for g, s in la.logits["channels"].items():
        ref = np.asarray(lb.logits["channels"][g])
        idx = kept.get(g, np.arange(len(ref)))
        np.testing.assert_allclose(s, ref[idx], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(la.ids[g]), idx.astype(np.float32))
    for layer in spec.layers:
        wa, wb = la.weights, lb.weights
        for k in layer.path.split("/"):
            wa, wb = wa[k], wb[k]
        ref = np.asarray(wb["kernel"])
        if layer.in_group in kept:
            ref = np.take(ref, kept[layer.in_group], axis=-2)
        if layer.out_group in kept:
            ref = np.take(ref, kept[layer.out_group], axis=-1)
        np.testing.assert_allclose(wa["kernel"], ref, rtol=1e-4, atol=1e-5)
    # the compacted net's metrics are fractions of the full net's cost, as the full run's
    np.testing.assert_allclose(a.last("search1")["flops"], b.last("search1")["flops"], rtol=1e-6)


def test_structured_search_segments_equal_one_run_and_restructure():
    """structured_search restructured at full widths (margin 1: nothing dropped) is the one-call
    search of structured_phases (temperature, key, lr schedule, momentum and data order continue
    across the segments); with a margin < 1 it trains narrower nets and still extracts exactly."""
    x, model, spec, task = _toy(2, 8)
    cfg = ps.StructuredConfig(epochs=4, lr=0.05, mask_lr=0.5, lmbda=5.0, beta_final=4.0, budget=0.5,
                              weight_decay=1e-3, seed_width=0.5, seed=3)
    state = init_state(model, x[:1], 0, cfg.transform(spec).init)
    one = train_phases(task, ps.structured_phases(cfg, spec), state, batch_size=32, seed=3,
                       log=lambda s: None)
    seg = ps.structured_search(task, cfg, spec, state, batch_size=32, restructure_at=(0, 2), margin=1.0)
    assert [r["segment"] for r in seg.history] == [0, 0, 1, 1]
    assert [r["epoch"] for r in seg.history] == [1, 2, 3, 4]
    assert all(r["width_flops"] == 1.0 for r in seg.history)
    for ra, rb in zip(seg.history, one.history):
        for k in ("train_loss", "test_loss", "flops", "lambda"):
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(seg.state.params.logits), jax.tree.leaves(one.state.params.logits)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    narrow = ps.structured_search(task, cfg, spec, state, batch_size=32, restructure_at=(0, 2), margin=0.25)
    assert [e for e, _ in narrow.widths] == [0, 2]
    w0 = narrow.widths[0][1]
    assert w0 == ps.margin_widths(spec, state.params, 0.25)
    shares = [r["width_flops"] for r in narrow.history]
    assert 0 < shares[0] < 1 and shares[0] == shares[1]
    np.testing.assert_allclose(shares[0], pf.full_cost(ps.gate_spec(pe.slim_model(spec, w0), x[:1]))
                               / pf.full_cost(spec), rtol=1e-6)
    st = narrow.state
    gated = narrow.spec.model.apply(
        {"params": cfg.transform(narrow.spec, reference=spec).apply(st.params, Context.make(train=False)),
         "batch_stats": st.batch_stats}, x[64:])
    ex = pe.extract(narrow.spec, st.params, st.batch_stats)
    np.testing.assert_allclose(ex.model.apply(ex.variables, x[64:]), gated, rtol=1e-4, atol=1e-4)
    # the full-size state holds the compacted one at its ids
    ids = {g: np.asarray(v).astype(int) for g, v in st.params.ids.items()}
    for g, s in st.params.logits["channels"].items():
        np.testing.assert_array_equal(np.asarray(narrow.full.params.logits["channels"][g])[ids[g]], s)
    # one margin per restructuring: growing at epoch 0, settled at epoch 2 on the active channels
    # (segment 0 is narrow's, so narrow's epoch-2 widths are these plus its margin)
    settled = ps.structured_search(task, cfg, spec, state, batch_size=32, restructure_at=(0, 2),
                                   margin=(0.25, 0.0))
    assert settled.widths[0] == narrow.widths[0]
    sizes = spec.group_sizes
    active = settled.widths[1][1]
    for g, n in narrow.widths[1][1].items():
        m = math.ceil(0.25 * sizes[g])
        assert active[g] == n - m if n < sizes[g] else active[g] >= n - m
    assert any(active[g] < narrow.widths[1][1][g] for g in active)
    for g, s in settled.state.params.logits["channels"].items():
        assert s.shape == (active[g],)
    with pytest.raises(ValueError, match="one per restructuring"):
        ps.structured_search(task, cfg, spec, state, batch_size=32, restructure_at=(0, 2), margin=(0.25,))
    with pytest.raises(ValueError, match="margin must be in"):
        ps.structured_search(task, cfg, spec, state, batch_size=32, restructure_at=(0, 2), margin=(0.25, 2.0))
    with pytest.raises(ValueError, match="restructure_at"):
        ps.structured_search(task, cfg, spec, state, batch_size=32, restructure_at=(4,))


def test_a_settled_search_never_switches_an_off_block_back_on():
    """The compacted net keeps every block; settling (margin 0) pins everything off, cuts to the
    active channels even with ``multiple=4``, so a penalty that rewards growth (budget 1) widens
    nothing afterwards: the counted FLOPs never rise above the settled net's. Without settling the
    same penalty switches the seed's off blocks on. A growth margin after a settling one is refused."""
    x, model, spec, task = _toy(4, 14)
    cfg = ps.StructuredConfig(epochs=3, lr=0.05, mask_lr=1.0, lmbda=50.0, beta_final=4.0, budget=1.0,
                              weight_decay=0.0)
    state = init_state(model, x[:1], 0, cfg.transform(spec).init)
    off = [b for b, s in state.params.logits["blocks"].items() if np.asarray(s) <= 0]
    assert off                                              # the seed: one block per stage
    grown = ps.structured_search(task, cfg, spec, state, batch_size=32, restructure_at=(0,), margin=1.0)
    assert any(np.asarray(grown.full.params.logits["blocks"][b]) > 0 for b in off)
    # settling cuts to the active channels whatever ``multiple`` (spare channels could regrow)
    settled = ps.structured_search(task, cfg, spec, state, batch_size=32, restructure_at=(0,), margin=(0.0,),
                                   multiple=4)
    assert settled.widths[0][1] == {g: int(np.sum(np.asarray(v) > 0))
                                    for g, v in state.params.logits["channels"].items()}
    for b in off:
        assert np.asarray(settled.full.params.logits["blocks"][b]) == ps.PINNED_OFF
    for v in jax.tree.leaves(settled.full.params.logits):
        assert np.all((np.asarray(v) > 0) | (np.asarray(v) == ps.PINNED_OFF))
    with pytest.raises(ValueError, match="settle last"):
        ps.structured_search(task, cfg, spec, state, batch_size=32, restructure_at=(2, 0), margin=(0.25, 0.0))
    seed_flops = float(pf.cost(spec, *ps.hard_gates(state.params.logits)) / pf.full_cost(spec))
    assert max(r["flops"] for r in settled.history) <= seed_flops + 1e-6
