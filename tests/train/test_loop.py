import glob
import json
import os

import jax
import numpy as np
import pytest

from pae.train import CheckpointError, Checkpointer, TrainConfig, data_mesh, make_schedule, run
from pae.train.loop import ConfigChangedError
from pae.train.cli import build_parser


def _config(**kw):
    base = dict(model="lenet300_100", dataset="digits", epochs=4, batch_size=64,
                learning_rate=0.05, val_size=200)
    return TrainConfig(**{**base, **kw})


def test_short_run_learns_and_writes_records(tmp_path):
    result = run(_config(), workdir=str(tmp_path), progress=False)
    hist = result.history
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    assert hist[-1]["test_acc"] > 0.85 and hist[-1]["val_acc"] > 0.85  # chance is 0.10
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == hist
    assert open(tmp_path / "metrics.csv").readline().startswith(
        "phase,phase_index,epoch,phase_epoch,train_loss,train_acc,penalty,lr")
    assert [r["phase"] for r in hist] == ["train"] * 4
    assert json.load(open(tmp_path / "summary.json"))["0:train"] == hist[-1]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    final = json.load(open(tmp_path / "final.json"))
    assert final["num_params"] == 64 * 300 + 300 + 300 * 100 + 100 + 1010
    assert json.load(open(tmp_path / "config.json"))["model"] == "lenet300_100"


class _Interrupt(Exception):
    pass


def _interrupt_after(epochs):
    def callback(row, state):
        if row["epoch"] == epochs:
            raise _Interrupt
    return callback


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    # BN statistics, dropout keys, augmentation and shuffling all have to resume exactly.
    config = _config(model="wrn10_1", model_kwargs={"dropout": 0.3}, augment=True, epochs=3,
                     keep_checkpoints=5)
    mesh = data_mesh(jax.devices()[:1])  # (the 8-device path has its own test)
    whole = run(config, workdir=str(tmp_path / "whole"), progress=False, mesh=mesh)
    with pytest.raises(_Interrupt):
        run(config, workdir=str(tmp_path / "cut"), progress=False, mesh=mesh,
            callbacks=[_interrupt_after(2)])
    assert Checkpointer(tmp_path / "cut" / "checkpoints", {}).all_steps() == [1, 2]
    resumed = run(config, workdir=str(tmp_path / "cut"), progress=False, mesh=mesh)
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["test_loss"] for r in resumed.history] == [r["test_loss"] for r in whole.history]
    assert len(open(tmp_path / "cut" / "metrics.jsonl").readlines()) == 3


def test_checkpoints_keep_last_n_and_refuse_other_models(tmp_path):
    run(_config(epochs=3, keep_checkpoints=2), workdir=str(tmp_path), progress=False)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(int(os.path.basename(p)) for p in glob.glob(str(ckpt_dir / "[0-9]*"))) == [2, 3]
    with pytest.raises(CheckpointError, match="model: 'lenet300_100' -> 'lenet5'"):
        run(_config(model="lenet5", dataset="mnist_subset", epochs=3), workdir=str(tmp_path),
            progress=False)
    os.remove(tmp_path / "config.json")   # without it the checkpoint's identity still refuses
    with pytest.raises(CheckpointError, match="different run.*lenet300_100"):
        run(_config(model="lenet5", dataset="mnist_subset", epochs=3), workdir=str(tmp_path),
            progress=False)
    ckpt = Checkpointer(ckpt_dir, {"model": "m"})
    ckpt.save(1, {"w": np.zeros((3, 4), np.float32)})
    with pytest.raises(CheckpointError, match="w'\\]: saved float32\\[3, 4\\], expected float32\\[4, 4\\]"):
        ckpt.restore(1, {"w": jax.numpy.zeros((4, 4))})


def test_damaged_or_partial_checkpoints_are_never_loaded(tmp_path):
    run(_config(epochs=2), workdir=str(tmp_path), progress=False)
    ckpt_dir = tmp_path / "checkpoints"
    # an unfinished save (orbax's temporary directory) is not a checkpoint
    os.makedirs(ckpt_dir / "7.orbax-checkpoint-tmp-123")
    assert Checkpointer(ckpt_dir, {}).latest_step() == 2
    # damage every array file of the newest step
    for path in glob.glob(str(ckpt_dir / "2" / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(path) and "_METADATA" not in path and "manifest" not in path:
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 3, 1))
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
        run(_config(epochs=2), workdir=str(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match="epochs: 2 -> 3"):  # 3 epochs: another run
        run(_config(epochs=3), workdir=str(tmp_path), progress=False)


def test_a_changed_config_is_refused_naming_old_and_new_and_changes_nothing(tmp_path, directory_bytes):
    lines = []
    first = run(_config(epochs=2), workdir=str(tmp_path), progress=False, log=lines.append)
    before = directory_bytes(tmp_path)
    assert "config.json" in before and "metrics.jsonl" in before
    with pytest.raises(ConfigChangedError, match="learning_rate: 0.05 -> 0.1, batch_size: 64 -> 32"):
        run(_config(epochs=2, learning_rate=0.1, batch_size=32), workdir=str(tmp_path), progress=False)
    with pytest.raises(ConfigChangedError, match="epochs: 2 -> 1.*cannot be shortened"):
        run(_config(epochs=1), workdir=str(tmp_path), progress=False)
    with pytest.raises(ConfigChangedError, match="epochs: 2 -> 4.*extend=True"):   # not without extend
        run(_config(epochs=4), workdir=str(tmp_path), progress=False)
    with pytest.raises(ConfigChangedError, match="optimizer: 'nesterov' -> 'adam'.*milestones: \\[\\] -> \\[1\\]"):
        run(_config(epochs=4, optimizer="adam", schedule="step", milestones=(1,)), workdir=str(tmp_path),
            progress=False, extend=True)   # extend allows more epochs, nothing else
    assert directory_bytes(tmp_path) == before

    # extend: the saved run trains on from its saved epoch (its rows and state are kept)
    lines.clear()
    longer = run(_config(epochs=4, keep_checkpoints=5), workdir=str(tmp_path), progress=False,
                 log=lines.append, extend=True)
    assert lines[0].startswith("resumed from") and "epoch 2/4" in lines[0]
    assert [r["epoch"] for r in longer.history] == [1, 2, 3, 4]
    assert longer.history[:2] == first.history
    assert len(lines) == 3   # the resume line and epochs 3 and 4: epochs 1-2 were not trained again
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["epochs"] == 4 and saved["keep_checkpoints"] == 5   # a safe change is recorded
    # the same config again resumes the finished run; a shorter one is refused
    assert run(_config(epochs=4, keep_checkpoints=5), workdir=str(tmp_path), quiet=True).history == \
        longer.history
    with pytest.raises(ConfigChangedError, match="epochs: 4 -> 3"):
        run(_config(epochs=3), workdir=str(tmp_path), quiet=True)


def test_epoch_lines_go_to_stdout_without_the_bar_and_quiet_silences_them(tmp_path, capsys):
    run(_config(epochs=2), workdir=str(tmp_path / "a"), progress=False)
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out] == [["phase=train", "epoch=1"], ["phase=train", "epoch=2"]]
    run(_config(epochs=2), workdir=str(tmp_path / "a"), progress=False)
    assert capsys.readouterr().out.startswith("resumed from")
    lines = []
    run(_config(epochs=1), workdir=str(tmp_path / "b"), quiet=True, log=lines.append)
    assert lines == [] and capsys.readouterr() == ("", "")
    with pytest.raises(TypeError, match="log must be"):
        run(_config(), workdir=str(tmp_path / "c"), log="stdout")
    with pytest.raises(TypeError, match="config must be a pae.train.TrainConfig"):
        run({"model": "lenet5"}, workdir=str(tmp_path / "c"))


def test_schedules_per_epoch():
    step = make_schedule("step", 0.1, steps_per_epoch=10, epochs=8, milestones=(3, 6), decay=0.2)
    np.testing.assert_allclose([step(s) for s in (0, 29, 30, 59, 60, 79)],
                               [0.1, 0.1, 0.02, 0.02, 0.004, 0.004], rtol=1e-6)
    cosine = make_schedule("cosine", 1.0, 10, 4)
    np.testing.assert_allclose([cosine(0), cosine(20), cosine(40)], [1.0, 0.5, 0.0], atol=1e-6)
    warm = make_schedule("constant", 0.5, 10, 4, warmup_epochs=1)
    np.testing.assert_allclose([warm(0), warm(5), warm(10), warm(30)], [0, 0.25, 0.5, 0.5], atol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear", 0.1, 10, 4)
    with pytest.raises(ValueError, match="milestones"):
        make_schedule("step", 0.1, 10, 4, milestones=(3, 2))


@pytest.mark.parametrize("kwargs, error, says", [
    ({"momentum": float("nan")}, ValueError, r"momentum must be in \[0, 1\), got nan"),
    ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\), got 1.5"),
    ({"momentum": -0.9}, ValueError, "momentum must be in"),
    ({"momentum": "0.9"}, TypeError, "momentum must be a number"),
    ({"weight_decay": float("inf")}, ValueError, "weight_decay must be >= 0 and finite, got inf"),
    ({"lr_decay": float("nan")}, ValueError, "lr_decay must be"),
    ({"lr_decay": 0.0}, ValueError, "lr_decay must be > 0"),
    ({"schedule": "step", "milestones": (50,), "epochs": 5}, ValueError,
     r"milestones must be increasing epochs in \(0, epochs=5\), got \(50,\)"),
    ({"schedule": "step", "milestones": (3, 2), "epochs": 5}, ValueError, "milestones must be increasing"),
    ({"schedule": "step", "milestones": (2.5,), "epochs": 5}, TypeError, "milestones must be an int"),
    ({"schedule": "cosine", "milestones": (2, 3), "epochs": 5}, ValueError,
     r"milestones \(2, 3\) have no effect with schedule='cosine'"),
    ({"warmup_epochs": 5, "epochs": 5, "schedule": "constant"}, ValueError,
     "warmup_epochs must be below epochs=5"),
    ({"epochs": 2.5}, TypeError, "epochs must be an int, got 2.5"),
    ({"epochs": "5"}, TypeError, "epochs must be an int, got '5'"),
    ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
    ({"seed": None}, TypeError, "seed must be an int, got None"),
    ({"batch_size": True}, TypeError, "batch_size must be an int, got True")])
def test_config_fields_out_of_range_are_refused_naming_them(kwargs, error, says):
    """These were accepted silently: SGD diverging, a decay after the run, a warm-up never ending."""
    with pytest.raises(error, match=says):
        TrainConfig(**kwargs)


def test_config_defaults_and_valid_edges_are_accepted():
    assert TrainConfig().schedule == "cosine" and TrainConfig().milestones == ()   # default: no milestones
    assert TrainConfig(schedule="step", milestones=[2, 4], epochs=5, momentum=0.0,
                       weight_decay=0.0).milestones == [2, 4]
    assert TrainConfig(warmup_epochs=4, epochs=5, seed=np.int64(3)).seed == 3


def test_bad_configs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        TrainConfig(model="resnet19")
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainConfig(optimizer="adagrad2")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown schedule 'linear'; known: constant, cosine, step"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        run(_config(batch_size=60), workdir=str(tmp_path / "a"), progress=False)
    with pytest.raises(ValueError, match="takes text data"):
        run(_config(model="char_lstm"), workdir=str(tmp_path / "b"), progress=False)
    with pytest.raises(ValueError, match="cannot take inputs of shape \\(1, 8, 8, 1\\)"):
        run(_config(model="lenet5"), workdir=str(tmp_path / "c"), progress=False)



def test_model_kwargs_the_model_does_not_take_are_a_value_error_naming_them(tmp_path):
    """``--model-kwargs '{"bogus": 1}'`` is a user error (one line from the CLI), not a TypeError."""
    with pytest.raises(ValueError, match="model_kwargs \\{'bogus': 1\\} do not fit model 'lenet300_100'"):
        run(_config(model_kwargs={"bogus": 1}), workdir=str(tmp_path), progress=False)

def test_cli_maps_flags_to_config():
    args = vars(build_parser().parse_args(
        ["--model", "resnet20", "--epochs", "7", "--milestones", "3", "5", "--augment", "false",
         "--model-kwargs", '{"widths": [8, 16, 32]}']))
    assert args["model"] == "resnet20" and args["epochs"] == 7 and args["milestones"] == [3, 5]
    assert args["augment"] is False and args["model_kwargs"] == {"widths": [8, 16, 32]}
    assert args["dataset"] == TrainConfig().dataset


@pytest.mark.parametrize("name", ["avagrad", "avagradw", "adabound", "amsbound", "adaboundw", "csgd"])
def test_every_pae_optimizer_is_reachable_by_name_with_a_warmup_schedule(name):
    import jax.numpy as jnp

    from pae.train import make_optimizer

    schedule = make_schedule("cosine", 0.1, steps_per_epoch=5, epochs=4, warmup_epochs=1)
    tx = make_optimizer(name, schedule, weight_decay=1e-4, reference_lr=0.1)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    for _ in range(7):  # through the warm-up (lr 0 at step 0) into the cosine part
        updates, state = tx.update({"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)}, state, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert float(jnp.abs(updates["w"]).max()) > 0
