"""vt_phases on the engine: stages grow the state, resume mid-growth equals an uninterrupted run, a
tiny run learns."""
import jax
import numpy as np
import optax
import pytest

from pae import growth
from pae.models.growable import GrowableResNet, GrowableVGG
from pae.train import Phase, init_state, make_task, train_phases

MODEL = GrowableVGG((8, "M", 16), 3)
CFG = growth.VTConfig(growth_steps=2, first_epochs=1, epoch_schedule="fixed", total_epochs=4)


def _data(seed=0):
    """The class is the channel with the largest mean intensity (learnable by a tiny conv net)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(160, 8, 8, 3)).astype(np.float32)
    y = x.mean(axis=(1, 2)).argmax(-1).astype(np.int32)
    x += 0.5 * np.eye(3, dtype=np.float32)[y][:, None, None, :]
    return {"train": (x[:112], y[:112]), "test": (x[112:], y[112:])}


@pytest.fixture(scope="module")
def task():
    return make_task(MODEL, _data())


def _adam(spe):
    return optax.adam(1e-2)


def _run(task, **kw):
    phases = growth.vt_phases(CFG, MODEL, _adam)
    return train_phases(task, phases, init_state(phases[0].model, task.example, 0), batch_size=32, **kw)


@pytest.fixture(scope="module")
def whole(task):
    return _run(task)


def test_stages_grow_to_the_full_widths_and_learn(whole):
    assert [r["phase"] for r in whole.history] == ["stage0", "stage1", "stage2", "stage2"]
    assert [r["stage"] for r in whole.history] == [0, 1, 2, 2]
    params = [r["params"] for r in whole.history]
    assert params[0] < params[1] < params[2]
    assert whole.state.params["conv1"]["kernel"].shape == (3, 3, 8, 16)
    birth = whole.state.opt_state[1]
    assert int(birth.stage) == 2
    assert set(np.unique(np.asarray(birth.birth["conv1"]["kernel"]))) == {0, 1, 2}
    # 48 test examples after 4 epochs: the test accuracy swings with the growth key (0.46, 1.0,
    # 0.83, 0.67 for keys 0-3), the training loss does not (it more than halves for every key)
    assert whole.history[-1]["test_acc"] > 0.4            # chance: 1/3
    assert whole.history[-1]["train_loss"] < 0.5 * whole.history[0]["train_loss"]


def test_plain_sgd_without_lra_trains_every_stage(task):
    """lra=False with a momentum-free optimizer: the state holds nothing parameter-shaped; each
    growth gives tx.init of the grown params with the schedule's count going on (it failed entering
    stage 1, after stage 0 had trained)."""
    cfg = growth.VTConfig(growth_steps=2, first_epochs=1, epoch_schedule="fixed", total_epochs=3,
                          lra=False)
    phases = growth.vt_phases(cfg, MODEL, lambda spe: optax.sgd(optax.linear_schedule(0.1, 0.0, 100)))
    res = train_phases(task, phases, init_state(phases[0].model, task.example, 0), batch_size=32)
    assert [r["phase"] for r in res.history] == ["stage0", "stage1", "stage2"]
    assert res.state.params["conv1"]["kernel"].shape == (3, 3, 8, 16)
    (count,) = jax.tree.leaves(res.state.opt_state)
    assert int(count) == int(res.state.step) > 0               # the count never restarted
    assert all(np.isfinite(r["train_loss"]) for r in res.history)


def test_phases_are_stages_of_the_schedule():
    phases = growth.vt_phases(CFG, MODEL, _adam)
    assert [p.model.groups() for p in phases] == [{"conv0": 2, "conv1": 4}, {"conv0": 4, "conv1": 6},
                                                  {"conv0": 8, "conv1": 16}]
    assert [p.epochs for p in phases] == [1, 1, 2]
    assert phases[0].enter is None and phases[0].optimizer_state == "fresh"
    assert all(p.optimizer_state == "keep" and p.enter is not None for p in phases[1:])


def test_a_stage_entered_by_growth_preserves_the_function_of_the_previous_stage(task):
    """With vt='none' the first step of stage 1 sees the function stage 0 ended with."""
    cfg = growth.VTConfig(growth_steps=2, first_epochs=1, epoch_schedule="fixed", vt="none")
    phases = growth.vt_phases(cfg, MODEL, _adam)
    state0 = train_phases(task, phases[:1], init_state(phases[0].model, task.example, 0),
                          batch_size=32).state
    grown = phases[1].enter(jax.device_get(state0), {})
    x = _data()["test"][0]
    before = phases[0].model.apply({"params": state0.params, "batch_stats": state0.batch_stats}, x)
    after = phases[1].model.apply({"params": grown.params, "batch_stats": grown.batch_stats}, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resume_mid_growth_equals_an_uninterrupted_run(task, whole, tmp_path, stop_after):
    # 1: at the first growth transition; 3: inside the last (grown twice) stage
    def stop(row, state):
        if row["epoch"] == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        _run(task, checkpoint_dir=tmp_path, callbacks=[stop])
    lines = []
    resumed = _run(task, checkpoint_dir=tmp_path, log=lines.append)
    assert lines[0].startswith(f"resumed from {tmp_path} step {stop_after}")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state), jax.device_get(whole.state))
    drop = lambda h: [{k: v for k, v in r.items() if k != "epoch_time"} for r in h]  # noqa: E731
    assert drop(resumed.history) == drop(whole.history)


def test_bad_config_fails_clearly():
    with pytest.raises(ValueError, match="VTConfig.vt must be one of"):
        growth.VTConfig(vt="cubic")
    with pytest.raises(ValueError, match="VTConfig.growth_steps must be <= 15"):
        growth.VTConfig(growth_steps=20)
    for bad in (3, 0, 8.0):
        with pytest.raises(ValueError, match="VTConfig.width_multiple must be an even int >= 2"):
            growth.VTConfig(width_multiple=bad)
    assert growth.VTConfig(width_multiple=8, growth_steps=2).widths({"a": 64}) == [{"a": 16}, {"a": 24}, {"a": 64}]
    with pytest.raises(TypeError, match="model_from must be a growable model"):
        growth.vt_phases(CFG, object(), _adam)
    with pytest.raises(TypeError, match="cfg must be a VTConfig"):
        growth.vt_phases({}, MODEL, _adam)
    assert isinstance(growth.vt_phases(CFG, MODEL, _adam)[0], Phase)


def test_a_resnet_grows_through_the_engine_with_every_option_changed(task):
    """The residual stream, the 1x1 shortcuts and the linear rule / global per-step LRA / zero moments
    / muP-style new weights run through jitted steps; the grown stage still learns."""
    model = GrowableResNet(8, 3, (8, 8, 12))
    cfg = growth.VTConfig(growth_steps=1, first_epochs=2, epoch_schedule="fixed", vt="linear",
                          new_init="mup", new_moments="zeros", lra_norms="global",
                          lra_recompute="step", lra_leaves="all")
    phases = growth.vt_phases(cfg, model, lambda spe: optax.sgd(0.05, 0.9))
    res = train_phases(task, phases, init_state(phases[0].model, task.example, 0), batch_size=32)
    assert res.state.params["s2b0"]["shortcut"]["kernel"].shape == (1, 1, 8, 12)
    assert [r["stage"] for r in res.history] == [0, 0, 1, 1]
    scale = np.asarray(res.state.opt_state[1].scale["s1b0"]["conv1"]["kernel"])
    assert len(np.unique(np.round(scale, 5))) == 2            # stage 0 (1) and stage 1 (global ratio)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


@pytest.mark.parametrize("method", ["net2net", "gradmax"])
def test_peer_growth_methods_run_as_stages_and_learn(task, method):
    """The ablation's peers through the same phases: widths reach the model's, the grown stages learn;
    GradMax takes its gradient on the given batch (a pure transition: two runs agree exactly)."""
    cfg = growth.VTConfig(growth_steps=2, first_epochs=1, epoch_schedule="fixed", total_epochs=4,
                          method=method, vt="none", lra=False, new_moments="zeros")
    x, y = _data()["train"]
    phases = growth.vt_phases(cfg, MODEL, _adam, gradient_batch={"inputs": x[:64], "targets": y[:64]})
    runs = [train_phases(task, phases, init_state(phases[0].model, task.example, 0), batch_size=32)
            for _ in range(2)]
    res = runs[0]
    assert [r["stage"] for r in res.history] == [0, 1, 2, 2]
    assert res.state.params["conv1"]["kernel"].shape == (3, 3, 8, 16)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] - 0.1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(runs[1].state.params),
                 jax.device_get(res.state.params))


def test_peer_configs_fail_clearly():
    with pytest.raises(ValueError, match="VTConfig.method must be one of"):
        growth.VTConfig(method="firefly")
    cfg = growth.VTConfig(growth_steps=1, method="gradmax")
    with pytest.raises(ValueError, match="gradient_batch must be a dict with 'inputs' and 'targets'"):
        growth.vt_phases(cfg, MODEL, _adam)
