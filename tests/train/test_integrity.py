"""Training you can trust: damaged checkpoints are refused (or skipped when asked), a diverged run stops
without recording or checkpointing its bad epoch, metrics files stay valid JSON, padded rows stay out
of BatchNorm statistics."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pae import models
from pae.train import (DamagedCheckpointError, Phase, TrainingDiverged, create_train_state, init_state,
                       make_task, make_train_step, train_phases)
from pae.train.metrics import write_history


def _task():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    return make_task(models.get_model("lenet300_100", 2), {"train": (x[:96], y[:96]), "test": (x[96:], y[96:])})


def _phases(lr=0.05, epochs=4):
    return [Phase("train", epochs, lambda spe: optax.sgd(lr, 0.9))]


def _flip_bytes(step_dir: str, count: int = 64) -> str:
    """Flip ``count`` bytes in the middle of the largest array data file of a checkpoint step."""
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(p) and "METADATA" not in p.upper() and "manifest" not in p]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        for i in range(middle, min(middle + count, len(data))):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)
    return path


def _equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_flipped_bytes_raise_naming_the_step_and_previous_resumes_from_the_newest_intact(tmp_path):
    task = _task()
    state = init_state(task.model, task.example, 0)
    whole = train_phases(task, _phases(), state, batch_size=32)
    ckpt = tmp_path / "ckpt"
    train_phases(task, _phases(epochs=3), state, batch_size=32, checkpoint_dir=ckpt)
    _flip_bytes(str(ckpt / "3"))
    with pytest.raises(DamagedCheckpointError, match=r"step 3\) is damaged.*previous checkpoint \(step 2\)"):
        train_phases(task, _phases(), state, batch_size=32, checkpoint_dir=ckpt, extend_last_phase=True)
    assert sorted(os.listdir(ckpt)) == ["1", "2", "3"]   # a refused run moves nothing
    lines = []
    resumed = train_phases(task, _phases(), state, batch_size=32, checkpoint_dir=ckpt,
                           extend_last_phase=True, on_damaged_checkpoint="previous", log=lines.append)
    assert "checkpoint step 3 is damaged and was moved to" in lines[0]
    assert "step 2" in lines[1] and (ckpt / "3.damaged").is_dir()
    _equal(resumed.state, whole.state)   # epochs 3 and 4 trained again from the intact step 2


def test_a_damaged_history_is_refused(tmp_path):
    from pae.train import Checkpointer

    ckpt = Checkpointer(tmp_path, {"run": 1})
    ckpt.save(1, {"w": np.arange(4.0, dtype=np.float32)}, [{"epoch": 1, "loss": 0.5}])
    meta_files = [p for p in glob.glob(str(tmp_path / "1" / "meta" / "**"), recursive=True)
                  if os.path.isfile(p) and p.endswith(".json") or "metadata" in p and os.path.isfile(p)]
    path = next(p for p in meta_files if '"loss": 0.5' in open(p).read())
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"loss": 0.5', '"loss": 0.25'))
    with pytest.raises(DamagedCheckpointError, match="metric history does not match"):
        ckpt.restore(1, {"w": jnp.zeros(4)})



def _edit_meta(step_dir: str, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in the JSON metadata of a checkpoint step."""
    path = next(p for p in glob.glob(os.path.join(step_dir, "meta", "**"), recursive=True)
                if os.path.isfile(p) and old in open(p).read())
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def test_a_damaged_position_in_the_metadata_is_refused_and_previous_resumes(tmp_path):
    """The position (and every other metadata value) is covered by a checksum: a damaged one must not
    resume from the wrong epoch."""
    task = _task()
    state = init_state(task.model, task.example, 0)
    whole = train_phases(task, _phases(), state, batch_size=32)
    train_phases(task, _phases(epochs=3), state, batch_size=32, checkpoint_dir=tmp_path)
    _edit_meta(str(tmp_path / "3"), '"position": [0, 3]', '"position": [0, 2]')
    with pytest.raises(DamagedCheckpointError, match=r"\(step 3\) is damaged: its metadata"):
        train_phases(task, _phases(), state, batch_size=32, checkpoint_dir=tmp_path, extend_last_phase=True)
    resumed = train_phases(task, _phases(), state, batch_size=32, checkpoint_dir=tmp_path,
                           extend_last_phase=True, on_damaged_checkpoint="previous")
    _equal(resumed.state, whole.state)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]

def test_a_non_finite_loss_stops_the_run_without_recording_or_checkpointing_it(tmp_path):
    task = _task()
    state = init_state(task.model, task.example, 0)
    phases = [Phase("ok", 1, lambda spe: optax.sgd(0.01)),
              Phase("diverges", 2, lambda spe: optax.sgd(1e30))]
    with pytest.raises(TrainingDiverged, match=r"phase 'diverges', epoch \d: the training loss is .*not "
                                               r"finite.*newest checkpoint is step \d"):
        train_phases(task, phases, state, batch_size=32, workdir=tmp_path, checkpoint_dir=tmp_path / "c")
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in open(tmp_path / "metrics.jsonl")]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    saved = sorted(int(p) for p in os.listdir(tmp_path / "c") if p.isdigit())
    assert saved == [r["epoch"] for r in rows]   # no checkpoint of the bad epoch


def test_a_sweep_over_parallel_runs_continues_past_the_runs_that_diverge(tmp_path):
    """on_diverged="continue": the run with a huge learning rate goes NaN, the others train exactly
    as they do alone, the diverged run's values are null in the metrics files; by default the whole
    sweep stops at the first non-finite epoch."""
    import jax.numpy as jnp

    task = _task()
    state = create_train_state(task.model, optax.inject_hyperparams(optax.sgd)(learning_rate=0.05),
                               task.example, 0)
    lrs = jnp.asarray([0.05, 1e30, 0.01])
    phases = [Phase("sweep", 3, lambda spe: optax.inject_hyperparams(optax.sgd)(learning_rate=0.05),
                    optimizer_state="keep")]

    def setup(s, lr):
        return s.replace(opt_state=s.opt_state._replace(hyperparams={"learning_rate": lr}))

    with pytest.raises(TrainingDiverged, match="not finite"):
        train_phases(task, phases, state, batch_size=32, runs=lrs, setup=setup)
    sweep = train_phases(task, phases, state, batch_size=32, runs=lrs, setup=setup, on_diverged="continue",
                         workdir=tmp_path)
    losses = np.asarray(sweep.history[-1]["train_loss"], np.float64)
    assert not np.isfinite(losses[1]) and np.all(np.isfinite(losses[[0, 2]]))
    for i in (0, 2):
        alone = train_phases(task, phases, setup(state, lrs[i]), batch_size=32)
        np.testing.assert_allclose(losses[i], alone.history[-1]["train_loss"], rtol=1e-5)
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["train_loss"][1] is None
    with pytest.raises(ValueError, match="on_diverged must be one of"):
        train_phases(task, phases, state, batch_size=32, on_diverged="ignore")


def test_metrics_files_are_valid_json_and_csv_with_non_finite_values(tmp_path):
    write_history(str(tmp_path), [{"epoch": 1, "val_loss": float("nan"), "acc": [0.5, float("inf")]}])
    row = json.loads(open(tmp_path / "metrics.jsonl").read(),
                     parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert row == {"epoch": 1, "val_loss": None, "acc": [0.5, None]}
    assert open(tmp_path / "metrics.csv").read().splitlines()[1].startswith("1,,")


def test_padded_rows_change_no_batchnorm_statistic_in_a_train_step():
    model = models.get_model("resnet20", 10, widths=(4, 8, 8))
    rng = np.random.default_rng(3)
    real = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    garbage = 50 * rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    targets = rng.integers(0, 10, 10).astype(np.int32)
    tx = optax.sgd(0.1, 0.9)
    step = make_train_step(model, tx, pass_mask=True, donate=False)
    state = create_train_state(model, tx, jnp.asarray(real[:1]), 0)
    padded = {"inputs": jnp.asarray(np.concatenate([real, garbage])), "targets": jnp.asarray(targets),
              "mask": jnp.asarray([1.0] * 6 + [0.0] * 4)}
    only_real = {"inputs": jnp.asarray(real), "targets": jnp.asarray(targets[:6]), "mask": jnp.ones(6)}
    a, ma = step(state, padded, {})
    b, mb = step(state, only_real, {})
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5),
                 jax.device_get(a.batch_stats), jax.device_get(b.batch_stats))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5),
                 jax.device_get(a.params), jax.device_get(b.params))
    assert float(ma["loss_sum"]) == pytest.approx(float(mb["loss_sum"]), rel=1e-5)
    # without the mask the garbage rows do move the statistics
    c, _ = make_train_step(model, tx, donate=False)(state, padded, {})
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                         jax.device_get(c.batch_stats), jax.device_get(b.batch_stats))
    assert max(jax.tree.leaves(moved)) > 1e-2


def test_run_refuses_a_damaged_checkpoint_and_resume_intact_continues_from_the_previous(tmp_path):
    from pae.train import TrainConfig, run

    config = TrainConfig(model="lenet300_100", dataset="digits", epochs=2, batch_size=64)
    whole = run(config, workdir=str(tmp_path / "whole"), quiet=True)
    run(config, workdir=str(tmp_path / "cut"), quiet=True)
    _flip_bytes(str(tmp_path / "cut" / "checkpoints" / "2"))
    with pytest.raises(DamagedCheckpointError, match=r"\(step 2\) is damaged.*--resume-intact"):
        run(config, workdir=str(tmp_path / "cut"), quiet=True)
    lines = []
    resumed = run(config, workdir=str(tmp_path / "cut"), resume_intact=True, log=lines.append)
    assert any("checkpoint step 2 is damaged" in line for line in lines)
    _equal(resumed.state, whole.state)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_writing_records_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")   # stands for a notebook's inline backend
        from pae.train.metrics import plot_history
        plot_history([{"epoch": 1, "phase": "a", "phase_index": 0, "train_loss": 1.0, "train_acc": 0.5},
                      {"epoch": 2, "phase": "b", "phase_index": 1, "train_loss": 0.5, "train_acc": 0.7}],
                     str(tmp_path / "curves.png"))
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "curves.png").stat().st_size > 5_000
    finally:
        matplotlib.use(before)


def _corrupting_writes(monkeypatch, times: int):
    """Make the next ``times`` checkpoint writes land on disk with flipped bytes."""
    import orbax.checkpoint as ocp
    real_save, left = ocp.CheckpointManager.save, [times]

    def save(self, step, *args, **kwargs):
        out = real_save(self, step, *args, **kwargs)
        self.wait_until_finished()
        if left[0] > 0:
            left[0] -= 1
            _flip_bytes(os.path.join(os.fspath(self.directory), str(step)))
        return out

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def test_a_write_that_does_not_read_back_is_written_again_and_old_steps_are_kept_until_then(
        tmp_path, monkeypatch):
    from pae.train import Checkpointer
    state = {"w": np.arange(4096, dtype=np.float32), "b": np.ones(3, np.float32)}
    ckpt = Checkpointer(tmp_path, {"run": 1}, max_to_keep=1)
    ckpt.save(1, state)
    _corrupting_writes(monkeypatch, 1)
    ckpt.save(2, jax.tree.map(lambda x: x + 1, state))   # first write damaged, second intact
    assert ckpt.all_steps() == [2] and (tmp_path / "2.damaged").is_dir()
    restored, _ = ckpt.restore(2, state)
    _equal(restored, jax.tree.map(lambda x: x + 1, state))


def test_a_write_damaged_twice_raises_and_keeps_the_last_good_step(tmp_path, monkeypatch):
    from pae.train import Checkpointer
    state = {"w": np.arange(4096, dtype=np.float32)}
    ckpt = Checkpointer(tmp_path, {"run": 1}, max_to_keep=1)
    ckpt.save(1, state)
    _corrupting_writes(monkeypatch, 2)
    with pytest.raises(DamagedCheckpointError, match=r"step 2 did not read back whole after writing it "
                                                     r"twice.*earlier steps .* are intact"):
        ckpt.save(2, jax.tree.map(lambda x: x + 1, state))
    assert ckpt.all_steps() == [1]   # with keep 1, the good step was not deleted for a bad one
    _equal(ckpt.restore(1, state)[0], state)
    unverified = Checkpointer(tmp_path / "trusting", {"run": 1}, max_to_keep=1, verify=False)
    _corrupting_writes(monkeypatch, 1)
    unverified.save(1, state)   # verify=False: the damage is found only when read
    with pytest.raises(DamagedCheckpointError, match="do not match the checksums"):
        unverified.restore(1, state)


def test_checkpointer_arguments_are_checked():
    from pae.train import Checkpointer
    with pytest.raises(ValueError, match="max_to_keep must be an int >= 1, got 0"):
        Checkpointer("/tmp/unused", {}, max_to_keep=0)
    with pytest.raises(TypeError, match="verify must be a bool"):
        Checkpointer("/tmp/unused", {}, verify="yes")
    with pytest.raises(TypeError, match="identity must be a mapping"):
        Checkpointer("/tmp/unused", [("run", 1)])
    with pytest.raises(ValueError, match="identity must hold finite numbers"):
        Checkpointer("/tmp/unused", {"lr": float("nan")})


@pytest.mark.parametrize("identity", [{"widths": (300, 100)}, {"lr": np.float32(0.1)}, {1: "a"}],
                         ids=["tuple", "numpy scalar", "int key"])
def test_an_identity_that_json_changes_is_saved_and_resumed(tmp_path, identity):
    """The identity is compared as it reads back from JSON: tuples, NumPy scalars and int keys
    failed the checkpointer's own read-back of every save."""
    from pae.train import CheckpointError, Checkpointer
    state = {"w": jnp.arange(4.0)}
    Checkpointer(tmp_path, identity).save(1, state)
    assert not glob.glob(str(tmp_path / "*.damaged*"))
    _equal(Checkpointer(tmp_path, dict(identity)).restore(1, state)[0], state)   # a later run resumes
    with pytest.raises(CheckpointError, match="different run"):
        Checkpointer(tmp_path, {"widths": (300, 200)}).restore(1, state)


def test_host_leaves_are_saved_in_jax_dtypes_and_restored(tmp_path):
    """float64/int64 NumPy arrays and Python numbers (x64 off) are saved as float32/int32, the dtypes
    a restore gives them; they were reported as damaged (and moved aside), a Python int failed."""
    from pae.train import Checkpointer
    state = {"w": np.linspace(0, 1, 5), "n": np.arange(3), "step": 3, "lr": 0.5, "flag": np.bool_(True)}
    ckpt = Checkpointer(tmp_path, {"run": 1})
    ckpt.save(1, state)
    assert ckpt.all_steps() == [1] and not glob.glob(str(tmp_path / "*.damaged*"))
    restored, _ = ckpt.restore(1, state)
    assert {k: str(v.dtype) for k, v in restored.items()} == {
        "w": "float32", "n": "int32", "step": "int32", "lr": "float32", "flag": "bool"}
    for k, v in state.items():
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v, restored[k].dtype))
    _equal(ckpt.restore(1, jax.tree.map(jnp.asarray, state))[0], restored)   # device targets too


def test_leaves_a_checkpoint_cannot_hold_are_refused_naming_them(tmp_path):
    from pae.train import Checkpointer
    ckpt = Checkpointer(tmp_path, {"run": 1})
    with pytest.raises(TypeError, match=r"leaf \['opt'\]\['name'\] is a str"):
        ckpt.save(1, {"w": np.zeros(2, np.float32), "opt": {"name": "sgd"}})
    with pytest.raises(TypeError, match=r"leaf \['tags'\] is a ndarray of dtype <U1"):
        ckpt.save(1, {"tags": np.array(["a", "b"])})
    with pytest.raises(ValueError, match=r"leaf \['n'\] holds integers beyond int32"):
        ckpt.save(1, {"n": np.array([2 ** 40])})
    assert ckpt.all_steps() == []
