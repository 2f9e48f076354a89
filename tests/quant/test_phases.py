"""The two phases on the engine: a tiny MLP learns, its average learned width reaches the budget,
the palette transition snaps it, and the exported packed model reproduces the phase-2 logits."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pae import quant as q
from pae.core import map_nodes
from pae.train import init_state, make_task, train_phases


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


def _data():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 12)) * 1.5
    def split(n):
        y = rng.integers(0, 4, n)
        return (means[y] + rng.normal(size=(n, 12))).astype(np.float32), y.astype(np.int32)
    return {"train": split(384), "test": split(192)}


CFG = q.QuantConfig(noise_epochs=8, finetune_epochs=2, lr=3e-3, bits_lr=0.05, b_init=6.0,
                    target_bits=3.0, seed=1)


def test_phases_learn_reach_the_budget_and_export_matches():
    task = make_task(MLP(), _data())
    t = q.noise_transform(CFG)
    state = init_state(task.model, task.example, CFG.seed, t.init)
    assert float(q.average_bits(state.params)) == pytest.approx(6.0, rel=1e-5)
    res = train_phases(task, q.quant_phases(CFG), state, batch_size=64)
    noise = res.rows("noise")
    assert [r["phase"] for r in res.history] == ["noise"] * 8 + ["finetune"] * 2
    assert noise[-1]["train_loss"] < 0.7 * noise[0]["train_loss"]
    assert noise[-1]["weight_bits"] == pytest.approx(3.0, abs=0.3)          # the budget is reached
    assert noise[0]["weight_bits"] > 4.5                                      # ... from 6 bits
    searched = res.snapshots["noise"].params
    assert float(q.average_bits(searched)) == pytest.approx(noise[-1]["weight_bits"], rel=1e-5)
    fin = res.last("finetune")
    assert fin["test_acc"] > 0.85                                             # chance is 0.25
    assert 1.5 <= fin["weight_bits"] <= 4.5
    latent = jax.device_get(res.state.params)
    for name in ("Dense_0", "Dense_1"):
        node = latent[name]["kernel"]
        assert isinstance(node, q.QuantWeight)
        assert set(np.unique(node.bits)) <= set(np.asarray(node.levels).tolist())
        lv = np.asarray(node.levels)
        assert 1 <= lv[0] <= 4 and 4 <= lv[-1] <= 8 or lv[0] == lv[-1]
    # the widths did not move in phase 2 (frozen); the weights did
    np.testing.assert_array_equal(latent["Dense_0"]["kernel"].bits,
                                  q.assign_palette(searched)["Dense_0"]["kernel"].bits)
    assert not np.allclose(latent["Dense_0"]["kernel"].weight, searched["Dense_0"]["kernel"].weight)
    # export: the packed model's logits are the phase-2 model's
    x = jnp.asarray(_data()["test"][0][:50])
    ref = task.model.apply({"params": q.palette_quantizer().apply(latent, None)}, x)
    ex = q.export(task.model, latent)
    np.testing.assert_allclose(jax.jit(ex.apply)(ex.tree, x), ref, rtol=1e-4,
                               atol=1e-5 * float(np.abs(ref).max()))


def test_config_is_validated():
    for kwargs, match in (({"b_init": 9.0}, "b_init"), ({"target_bits": 0.5}, "target_bits"),
                          ({"palette": (5, 6)}, "outside its range"), ({"levels": 3}, "levels"),
                          ({"noise_epochs": -1}, "noise_epochs"), ({"bits_lr": -1.0}, "bits_lr"),
                          ({"granularity": "x"}, "granularity")):
        with pytest.raises(ValueError, match=match):
            q.QuantConfig(**kwargs)


def test_resume_across_the_palette_transition_is_exact(tmp_path):
    import dataclasses
    cfg = dataclasses.replace(CFG, noise_epochs=2, finetune_epochs=1)
    task = make_task(MLP(), _data())
    state = init_state(task.model, task.example, cfg.seed, q.noise_transform(cfg).init)
    train_phases(task, q.quant_phases(cfg), state, batch_size=64, checkpoint_dir=tmp_path)
    longer = dataclasses.replace(cfg, finetune_epochs=2)
    # resumes inside phase 2: the engine replays the (host-side) palette transition for the structure
    resumed = train_phases(task, q.quant_phases(longer), state, batch_size=64,
                           checkpoint_dir=tmp_path, extend_last_phase=True)
    full = train_phases(task, q.quant_phases(longer), state, batch_size=64)
    assert [r["phase"] for r in resumed.history] == ["noise", "noise", "finetune", "finetune"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(full.state.params))


def test_parallel_runs_assign_each_run_its_own_palette_as_separate_runs_do():
    """With runs=, the host-side transition into phase 2 (NumPy palette search) is applied to each
    run and stacked again (it cannot be vmapped): each run ends as it does alone."""
    task = make_task(MLP(), _data())
    cfg = q.QuantConfig(noise_epochs=2, finetune_epochs=1, lr=1e-2, bits_lr=0.1, target_bits=3.0)
    state = init_state(task.model, task.example, 0, q.noise_transform(cfg).init)
    shift = jnp.asarray([0.0, -4.0])     # run 1 starts with narrower widths (logits shifted)

    def setup(s, v):
        return s.replace(params=map_nodes(lambda n: n.replace(logits=n.logits + v), s.params, q.NoisyWeight))

    par = train_phases(task, q.quant_phases(cfg), state, batch_size=32, runs=shift, setup=setup)
    bits = lambda p: [np.asarray(n.bits) for n in jax.tree.leaves(p, is_leaf=lambda x: isinstance(x, q.QuantWeight))
                      if isinstance(n, q.QuantWeight)]   # noqa: E731
    for i in range(2):
        one = train_phases(task, q.quant_phases(cfg), setup(state, shift[i]), batch_size=32)
        run_i = jax.tree.map(lambda x: np.asarray(x)[i], jax.device_get(par.state.params))
        for a, b in zip(bits(run_i), bits(jax.device_get(one.state.params))):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(par.history[-1]["test_acc"][i], one.history[-1]["test_acc"], atol=1e-6)
    assert not all(np.array_equal(a, b) for a, b in zip(*(bits(jax.tree.map(lambda x: np.asarray(x)[i],
                                                                               jax.device_get(par.state.params)))
                                                          for i in range(2))))
