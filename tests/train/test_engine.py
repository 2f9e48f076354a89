"""The phase engine: transitions (shape-changing and latent-replacing), snapshots, bit-exact resume at
every kind of boundary, parallel runs equal to sequential ones, one compile per distinct phase."""
import json
from collections import deque
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pae import sparsity as sp
from pae.core import Transform, identity
from pae.train import (CheckpointError, Phase, TrainingDiverged, TrainState, engine, evaluate, init_state,
                       make_task, train_phases)
from pae.train.compilation import AHEAD_THREAD, compile_clock


class MLP(nn.Module):
    width: int = 6

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(self.width)(x.reshape((x.shape[0], -1))))
        return nn.Dense(3)(x)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(150, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    return {"train": (x[:100], y[:100]), "test": (x[100:], y[100:])}


@pytest.fixture(scope="module")
def task():
    return make_task(MLP(), _data())


def _adam(spe):
    return optax.adam(1e-2)


def _pad(x, shape):
    """Zero-pad ``x`` up to ``shape`` (a grown leaf; other leaves unchanged)."""
    x = np.asarray(x)
    return np.pad(x, [(0, n - m) for m, n in zip(x.shape, shape)])


def grow(state: TrainState, snapshots) -> TrainState:
    """Widen the hidden layer 6 -> 8: new incoming weights random, new outgoing weights zero (the
    function is preserved); Adam's moments grown the same way with ``optax.tree_map_params``."""
    p = state.params
    new_in = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (5, 2)), np.float32) * 0.1
    shapes = {"Dense_0": {"kernel": (5, 8), "bias": (8,)}, "Dense_1": {"kernel": (8, 3), "bias": (3,)}}
    grown = jax.tree.map(lambda x, s: _pad(x, s), p, shapes)
    grown["Dense_0"]["kernel"][:, 6:] = new_in
    opt = optax.tree_map_params(_adam(1), lambda x, s: _pad(x, s), state.opt_state, shapes,
                                transform_non_params=lambda x: x)
    return state.replace(params=grown, opt_state=opt)


WIDE = MLP(width=8)


def _phases():
    return [Phase("a", 2, _adam, keep={1: "early"}),
            Phase("b", 2, _adam, enter=grow, model=WIDE, optimizer_state="keep", keep={2: "grown"}),
            Phase("c", 2, _adam, model=WIDE,
                  enter=lambda st, snaps: st.replace(params=snaps["grown"].params))]


def _run(task, **kw):
    return train_phases(task, _phases(), init_state(task.model, task.example, 0), batch_size=32, **kw)


def _equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_shape_changing_transition_preserves_function_and_grows_optimizer_state(task):
    res = _run(task)
    assert [r["phase"] for r in res.history] == ["a", "a", "b", "b", "c", "c"]
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4, 5, 6]
    assert res.state.params["Dense_0"]["kernel"].shape == (5, 8)
    mu = res.state.opt_state[0].mu["Dense_1"]["kernel"]
    assert mu.shape == (8, 3) and np.abs(np.asarray(mu)).max() > 0
    # growth preserves the function: a run stopped right after the transition has the logits of
    # the narrow net at the end of phase a
    narrow = train_phases(task, _phases()[:1], init_state(task.model, task.example, 0), batch_size=32)
    x = jnp.asarray(_data()[1] if False else _data()["test"][0])
    before = MLP().apply({"params": narrow.state.params}, x)
    after = WIDE.apply({"params": grow(narrow.state, {}).params}, x)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_snapshots_are_the_states_after_their_epochs(task):
    res = _run(task)
    one = train_phases(task, [Phase("a", 1, _adam)], init_state(task.model, task.example, 0),
                       batch_size=32)
    _equal(res.snapshots["early"].params, one.state.params)
    # phase c entered by restoring phase b's end: its first epoch starts from the grown snapshot
    assert set(res.snapshots) == {"early", "grown"}
    assert res.snapshots["grown"].params["Dense_0"]["kernel"].shape == (5, 8)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 2, 3, 4, 5])
def test_resume_at_every_boundary_is_bit_exact(task, tmp_path, stop_after):
    # 1, 3, 5: mid-phase; 2: at the shape-changing transition; 4: at the latent-replacing one
    whole = _run(task)

    def stop(row, state):
        if row["epoch"] == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        _run(task, checkpoint_dir=tmp_path, callbacks=[stop])
    resumed = _run(task, checkpoint_dir=tmp_path)
    _equal(resumed.state, whole.state)
    _equal(resumed.snapshots, whole.snapshots)
    drop_time = lambda h: [{k: v for k, v in r.items() if k != "epoch_time"} for r in h]  # noqa
    assert drop_time(resumed.history) == drop_time(whole.history)


def test_a_checkpoint_of_another_phase_list_is_refused_and_appending_phases_resumes(task, tmp_path):
    state = init_state(task.model, task.example, 0)
    first = train_phases(task, _phases()[:2], state, batch_size=32, checkpoint_dir=tmp_path)
    whole = _run(task)
    extended = _run(task, checkpoint_dir=tmp_path)        # one phase appended: continues
    _equal(extended.state, whole.state)
    assert extended.history[:4] == first.history
    with pytest.raises(CheckpointError, match="another phase list"):
        train_phases(task, [Phase("a", 3, _adam)], state, batch_size=32, checkpoint_dir=tmp_path)


def test_latent_replacing_transition_gives_the_new_latent_a_fresh_optimizer(task):
    cs = sp.continuous_sparsification(None, 0.5, lmbda=0.0, scaled=False)

    def to_cs(state, snapshots):
        return state.replace(params=cs.init(state.params, None))

    phases = [Phase("dense", 1, _adam),
              Phase("cs", 1, lambda spe: sp.cs_optimizer(sp.SearchConfig(epochs=1, rewind_epoch=0), spe), cs, enter=to_cs,
                    metrics=lambda st, ctx: {"density": sp.density(st.params)})]
    res = train_phases(task, phases, init_state(task.model, task.example, 0), batch_size=32)
    node = res.state.params["Dense_0"]["kernel"]
    assert isinstance(node, sp.SoftMask) and float(node.s_init) == 0.5
    assert 0 < res.history[-1]["density"] <= 1
    assert not np.allclose(node.logits, 0.5)   # the mask logits trained


def test_a_phase_without_a_context_draws_its_noise_from_the_run_seed(task):
    phases = [Phase("p", 1, _adam, metrics=lambda st, ctx: {"key": ctx.key[1].astype(jnp.float32)})]
    keys = [train_phases(task, phases, init_state(task.model, task.example, 0), batch_size=32,
                         seed=seed).history[-1]["key"] for seed in (0, 3)]
    assert keys == [float(jax.random.PRNGKey(s)[1]) for s in (0, 3)] and keys[0] != keys[1]


def test_parallel_runs_equal_sequential_runs(task):
    lrs = np.array([1e-3, 1e-2, 3e-2], np.float32)
    opt = lambda spe: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)  # noqa

    def set_lr(state, lr):
        return state.replace(opt_state=state.opt_state._replace(
            hyperparams={**state.opt_state.hyperparams, "learning_rate": lr}))

    phases = [Phase("p", 2, opt), Phase("q", 1, opt, optimizer_state="keep",
                                        enter=lambda st, sn: st.replace(step=st.step * 0))]
    state = init_state(task.model, task.example, 0)
    state = state.replace(opt_state=opt(1).init(state.params))
    par = train_phases(task, phases, state, batch_size=32, runs=jnp.asarray(lrs), setup=set_lr)
    assert len(par.history[-1]["test_acc"]) == 3
    for i, lr in enumerate(lrs):
        seq = train_phases(task, phases, set_lr(state, jnp.asarray(lr)), batch_size=32)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[i], b, rtol=1e-5, atol=1e-6),
                     jax.device_get(par.state.params), jax.device_get(seq.state.params))
        assert par.history[-1]["test_acc"][i] == seq.history[-1]["test_acc"]


def _counting_transform(traces: list) -> Transform:
    """The identity transform, appending to ``traces`` whenever its ``apply`` is traced."""
    def apply(latent, ctx):
        traces.append(1)
        return latent

    return identity()._replace(apply=apply)


def test_one_compiled_step_per_distinct_phase(task):
    traces = []
    t = _counting_transform(traces)
    phases = [Phase(f"r{i}", 1, _adam, t, optimizer_state="keep", eval_every=0) for i in range(4)]
    train_phases(task, phases, init_state(task.model, task.example, 0), batch_size=32)
    # one trace for the train step and one for the eval step, shared by the four phases
    assert len(traces) == 2


def _where_it_compiles(task, log, **kw):
    """``_run(task, **kw)``, ``{thread name prefix: [epochs finished at each compile]}`` and
    :func:`pae.train.compilation.compile_clock`'s (waited, ahead) seconds over the run."""
    log.events, log.tag = [], 0
    clock = compile_clock()
    waited, ahead = clock.seconds, clock.ahead_seconds
    res = _run(task, callbacks=[lambda row, state: setattr(log, "tag", row["epoch"])], **kw)
    where = {}
    for thread, epochs in log.events:
        where.setdefault(thread.rstrip("_0123456789"), []).append(epochs)
    return res, where, (clock.seconds - waited, clock.ahead_seconds - ahead)


def test_later_phases_compile_ahead_while_the_previous_one_trains(task, compile_log):
    # phases b and c change the model's shapes; their steps compile in the compile-ahead thread
    # while phase a trains, so the run itself compiles nothing after phase a's first epoch
    res, where, (_, ahead_s) = _where_it_compiles(task, compile_log, precompile=True)
    assert len(where[AHEAD_THREAD]) >= 2 and max(where["MainThread"]) <= 1 and ahead_s > 0
    plain, where_plain, (waited_s, ahead_s) = _where_it_compiles(task, compile_log, precompile=False)
    assert AHEAD_THREAD not in where_plain and {2, 4} <= set(where_plain["MainThread"])
    with pytest.raises(TypeError, match="precompile must be a bool, got str"):
        _run(task, precompile="no")
    assert ahead_s == 0 and waited_s > 0
    _equal(res.state, plain.state)
    assert res.history == [{**r, "epoch_time": h["epoch_time"]} for r, h in zip(plain.history, res.history)]


def test_evaluate_compiles_once_for_repeated_calls_and_after_training(task):
    traces = []
    phase = Phase("p", 1, _adam, _counting_transform(traces))
    res = train_phases(task, [phase], init_state(task.model, task.example, 0), batch_size=32)
    assert len(traces) == 2                                   # the train and the eval step
    rows = [evaluate(task, res.state, batch_size=32, phase=phase) for _ in range(3)]
    assert len(traces) == 2                                   # the engine's eval program, reused
    assert rows[0] == rows[2] and rows[0]["test_acc"] == res.history[-1]["test_acc"]
    assert identity() == identity()                          # equal pieces share programs too


def test_records_are_tagged_by_phase(task, tmp_path):
    res = _run(task, workdir=tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == json.loads(json.dumps(res.history))
    summary = json.load(open(tmp_path / "summary.json"))
    assert list(summary) == ["0:a", "1:b", "2:c"] and summary["2:c"] == rows[-1]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_bad_phases_fail_clearly(task):
    with pytest.raises(ValueError, match="epochs must be an int >= 0"):
        Phase("a", -1, _adam)
    with pytest.raises(ValueError, match="keep epochs must be in \\[0, epochs=2\\]"):
        Phase("a", 2, _adam, keep={3: "x"})
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        Phase("a", 2, _adam, optimizer_state="reuse")
    with pytest.raises(TypeError, match="transform must be a pae.Transform"):
        Phase("a", 2, _adam, transform=lambda p: p)
    state = init_state(task.model, task.example, 0)
    with pytest.raises(TypeError, match="phases\\[0\\] must be a pae.train.Phase"):
        train_phases(task, [("a", 2)], state, batch_size=32)
    widen = Phase("b", 1, _adam, model=WIDE, optimizer_state="keep",
                  enter=lambda st, sn: grow(st, sn).replace(opt_state=st.opt_state))
    with pytest.raises(ValueError, match="keeps the optimizer state"):
        train_phases(task, [Phase("a", 1, _adam), widen], state, batch_size=32)


def test_resume_after_a_host_side_enter_with_numpy_default_dtypes(task, tmp_path):
    """An ``enter`` returning float64 arrays and a Python int step (NumPy's defaults) is held as
    float32 / int32 by the run; resume replays it on placeholders and must expect the same."""
    def reset(state, snapshots):
        params = jax.tree.map(np.asarray, state.params)
        params["Dense_0"]["bias"] = np.full(np.shape(params["Dense_0"]["bias"]), 0.5)      # float64
        return state.replace(params=params, step=0)
    phases = lambda: [Phase("a", 1, _adam), Phase("b", 2, _adam, enter=reset)]  # noqa: E731
    run = lambda **kw: train_phases(task, phases(), init_state(task.model, task.example, 0),  # noqa: E731
                                    batch_size=32, **kw)
    whole = run()

    def stop(row, state):
        if row["epoch"] == 2:
            raise _Stop
    with pytest.raises(_Stop):
        run(checkpoint_dir=tmp_path, callbacks=[stop])
    _equal(run(checkpoint_dir=tmp_path).state, whole.state)


class _NanLastUpdate(NamedTuple):
    count: jax.Array


def test_a_last_update_that_overflows_is_not_recorded_or_checkpointed(task, tmp_path):
    """Each step's loss comes before its update: the epoch whose last update makes the weights NaN
    has a finite loss, and must still stop the run before it is recorded or saved."""
    spe = -(-100 // 32)

    def poisoned(_):
        def update(updates, state, params=None):
            bad = state.count == spe - 1
            return jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates), _NanLastUpdate(state.count + 1)
        return optax.chain(optax.sgd(0.1), optax.GradientTransformation(
            lambda p: _NanLastUpdate(jnp.zeros((), jnp.int32)), update))
    rows = []
    with pytest.raises(TrainingDiverged, match=r"epoch 1: \['params'\].* holds NaN or Inf"):
        train_phases(task, [Phase("a", 2, poisoned)], init_state(task.model, task.example, 0), batch_size=32,
                     checkpoint_dir=tmp_path, callbacks=[lambda row, state: rows.append(row)])
    assert rows == [] and not any(tmp_path.iterdir() if tmp_path.exists() else [])


def test_evaluation_batches_fit_the_devices_when_a_split_is_small():
    """A split smaller than the eval batch is clamped to one batch padded to a multiple of the
    devices (mask 0 on the padding), not to the split's size."""
    from pae.data import pipeline as pdata
    src = _data()["test"]
    from pae.train import make_task as mk
    t = mk(MLP(), {"train": _data()["train"], "test": (src[0][:10], src[1][:10])})
    batches = list(pdata.iterate_batches(t.evals["test"], 16, shuffle=False, clamp=True, clamp_multiple=4))
    assert len(batches) == 1 and batches[0]["mask"].shape == (12,) and batches[0]["mask"].sum() == 10
    with pytest.raises(TypeError, match="clamp_multiple"):
        list(pdata.iterate_batches(t.evals["test"], 16, clamp=True, clamp_multiple=1.5))


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"keep_checkpoints": 0}, "keep_checkpoints must be an int >= 1"),
    ({"checkpoint_every": 0.5}, "checkpoint_every must be an int >= 0"),
    ({"runs": np.float32(3.0)}, "runs must be a pytree of arrays with one leading axis.*\\[\\(\\)\\]"),
    ({"runs": {"a": np.zeros(2), "b": np.zeros(3)}}, "runs must be .*\\[\\(2,\\), \\(3,\\)\\]"),
])
def test_bad_run_arguments_are_refused_before_training(task, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_phases(task, [Phase("a", 1, _adam)], init_state(task.model, task.example, 0), batch_size=32,
                     **kwargs)


def test_bad_phase_fields_are_refused_when_the_phase_is_made():
    with pytest.raises(ValueError, match="data_epochs_from must be None or an int >= 0"):
        Phase("a", 1, _adam, data_epochs_from=-1)
    for field in ("enter", "context", "metrics", "eval_apply"):
        with pytest.raises(TypeError, match=f"{field} must be a function or None"):
            Phase("a", 1, _adam, **{field: "x"})


def test_evaluate_refuses_a_batch_the_devices_cannot_split_naming_it(task):
    """On 8 devices a batch of 3 must be a clear ValueError naming batch_size, not jax's sharding
    error from inside the first eval step."""
    state = init_state(task.model, task.example, 0)
    with pytest.raises(ValueError, match="batch_size=3 must be divisible by the number of devices"):
        evaluate(task, state, batch_size=3)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        evaluate(task, state, batch_size=0)


@pytest.mark.parametrize("kwargs, says", [({"seed": 5}, "seed: 0 -> 5"),
                                          ({"batch_size": 16}, "batch_size: 32 -> 16"),
                                          ({"drop_remainder": True}, "drop_remainder: False -> True")])
def test_a_checkpoint_is_not_resumed_with_other_batches(task, tmp_path, kwargs, says):
    """The seed, batch size and drop_remainder fix every epoch's batches (and steps per epoch): a run
    resumed with others silently trains on batches the saved run never saw."""
    def stop(row, state):
        raise _Stop
    run = lambda **kw: train_phases(task, [Phase("a", 2, _adam)], init_state(task.model, task.example, 0),  # noqa
                                    **{"batch_size": 32, "checkpoint_dir": tmp_path, **kw})
    with pytest.raises(_Stop):
        run(callbacks=[stop])
    with pytest.raises(CheckpointError, match=f"other batches: {says}"):
        run(**kwargs)
    assert [r["epoch"] for r in run().history] == [1, 2]


@pytest.mark.parametrize("other, differs", [
    (lambda: make_task(MLP(), _data(seed=1)), "data"),                         # same shapes, other rows
    (lambda: make_task(MLP(), {k: (x[:90], y[:90]) for k, (x, y) in _data().items()}), "data"),
    (lambda: make_task(MLP(width=7), _data()), "model_repr")])                 # same class, other fields
def test_a_checkpoint_of_another_task_is_refused_and_the_same_task_resumes(task, tmp_path, other, differs):
    """The identity holds a fingerprint of the training set and the model's fields: resuming a
    checkpoint written on other data (same shapes) would silently mix two training sets."""
    def stop(row, state):
        raise _Stop
    run = lambda t, **kw: train_phases(t, [Phase("a", 2, _adam)], init_state(t.model, t.example, 0),  # noqa
                                       batch_size=32, checkpoint_dir=tmp_path, **kw)
    with pytest.raises(_Stop):
        run(task, callbacks=[stop])
    with pytest.raises(CheckpointError, match=f"different run \\(they differ in {differs}\\)"):
        run(other())
    again = make_task(MLP(), _data())                      # the same task built again resumes
    assert [r["epoch"] for r in run(again).history] == [1, 2]


def test_make_task_evaluates_exactly_the_named_splits_and_refuses_unknown_ones():
    """A typo or a bare string gave a task with no evaluation at all (drivers failed later)."""
    from pae.data import load_dataset
    ds = load_dataset("digits")                                  # train and test, no validation
    assert list(make_task(MLP(), ds).evals) == ["test"]          # the default's validation may be missing
    assert list(make_task(MLP(), load_dataset("digits", val_size=50)).evals) == ["val", "test"]
    assert list(make_task(MLP(), ds, eval_splits=["test"]).evals) == ["test"]
    with pytest.raises(TypeError, match="eval_splits must be a sequence of split names .*got 'test'"):
        make_task(MLP(), ds, eval_splits="test")
    with pytest.raises(ValueError, match=r"does not have: \['tset'\]; available: \['test', 'train'\]"):
        make_task(MLP(), ds, eval_splits=("tset",))
    with pytest.raises(ValueError, match=r"does not have: \['validation'\]"):
        make_task(MLP(), ds, eval_splits=("validation", "test"))
    arrays = {**_data(), "ood": _data(seed=3)["test"]}
    assert list(make_task(MLP(), arrays).evals) == ["test", "ood"]   # a mapping: every split but train
    assert list(make_task(MLP(), arrays, eval_splits=("ood",)).evals) == ["ood"]
    with pytest.raises(ValueError, match=r"does not have: \['val'\]"):
        make_task(MLP(), arrays, eval_splits=("val",))


def test_a_checkpoint_written_before_fingerprints_still_resumes_saying_so(task, tmp_path, monkeypatch):
    """Checkpoints whose identity lacks the model's fields and the data fingerprint (written before
    they were added) resume as before; the log says the training set was not checked."""
    import importlib
    engine = importlib.import_module("pae.train.engine")
    with_fingerprints = engine._identity_of
    monkeypatch.setattr(engine, "_identity_of", lambda *a: {
        k: v for k, v in with_fingerprints(*a).items() if k not in ("data", "model_repr")})

    def stop(row, state):
        raise _Stop
    run = lambda **kw: train_phases(task, [Phase("a", 2, _adam)], init_state(task.model, task.example, 0),  # noqa
                                    batch_size=32, **kw)
    with pytest.raises(_Stop):
        run(checkpoint_dir=tmp_path, callbacks=[stop])
    monkeypatch.setattr(engine, "_identity_of", with_fingerprints)
    lines = []
    resumed = run(checkpoint_dir=tmp_path, log=lines.append)
    assert "predates training-data fingerprints" in lines[0] and "resumed from" in lines[1]
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    _equal(resumed.state, run().state)


@pytest.mark.parametrize("bounded", [True, False])
def test_metric_sums_keep_at_most_steps_in_flight_unfinished(bounded, monkeypatch):
    """The epoch and evaluation loops sum each step's metrics through ``_sum_in_flight``, which waits
    until at most ``STEPS_IN_FLIGHT`` of the running totals are unfinished. Unbounded, a host that
    dispatches faster than the devices run would queue the whole epoch (with several XLA:CPU devices,
    32 unfinished computations per device deadlock a cross-device all-reduce)."""
    bound = engine.STEPS_IN_FLIGHT
    if not bounded:
        monkeypatch.setattr(engine, "STEPS_IN_FLIGHT", 10**6)

    @jax.jit
    def slow_step(w):          # ~10 ms of matrix products per step on 2 cores; dispatch takes ~0.1 ms
        for _ in range(4):
            w = jnp.tanh(w @ w) / 8
        return w, {"loss_sum": jnp.sum(w), "count": jnp.float32(1)}

    w = jax.random.normal(jax.random.PRNGKey(0), (512, 512))
    slow_step(w)[0].block_until_ready()       # compiled
    total, pending, totals, unfinished, losses = None, deque(), [], [], []
    for _ in range(24):
        w, sums = slow_step(w)
        losses.append(sums["loss_sum"])
        total = engine._sum_in_flight(total, sums, pending)
        totals.append(total)
        unfinished.append(sum(not t["count"].is_ready() for t in totals))
    assert float(total["count"]) == 24
    np.testing.assert_allclose(float(total["loss_sum"]), np.sum(np.asarray(losses, np.float64)), rtol=1e-5)
    if bounded:
        assert max(unfinished) <= bound
    else:
        assert max(unfinished) > bound + 2     # the condition the bound exists for


def test_the_deadlock_script_completes_at_the_engines_bound_and_refuses_bad_input(load_script, capsys):
    """experiments/cpu_inflight_deadlock.py (whose 33-step case shows the deadlock, 60 s) completes
    with the engine's bound on 8 devices."""
    script = load_script("cpu_inflight_deadlock")
    bound = engine.STEPS_IN_FLIGHT
    assert script.main(["--in-flight", str(bound), "--steps", "200"]) == {bound: "completed"}
    assert f"8 devices, at most {bound} steps unfinished: completed" in capsys.readouterr().out
    for bad in (["--devices", "1"], ["--in-flight", "-1"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as exit_:
            script.main(bad)
        assert exit_.value.code == 2
    assert "--devices must be >= 2" in capsys.readouterr().err
