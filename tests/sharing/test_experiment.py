"""The sharing experiments in a reduced setting: experiments/sharing.py (WRN vs SWRN, folding) and
experiments/extrapolate.py (a looped net on tiny prefix sums)."""
import json

import numpy as np
import pytest


@pytest.mark.slow   # three WRN-22-1 programs compiled: about 2 CPU minutes under load
def test_reduced_sharing_experiment_saves_parameters_learns_and_folds(tmp_path, monkeypatch, load_script):
    sharing = load_script("sharing")
    monkeypatch.chdir(tmp_path)
    result = sharing.main(["--depth", "22", "--ks", "1", "--epochs", "1", "--seeds", "0",
                           "--pull", "1.0", "--pull-k", "2", "--name", "ci"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    wrn, swrn, pulled = result["rows"]
    assert (wrn["method"], swrn["method"], pulled["method"]) == ("WRN-22-1", "SWRN-22-1-1", "SWRN-22-1-2+pull")
    # WRN-22-1 minus the 4 shared 3x3 convs of each stage, plus one template and 4 coefficients each
    widths = (16, 32, 64)
    assert swrn["params"] == wrn["params"] - sum(3 * 9 * c * c for c in widths) + 3 * 4
    assert wrn["params"] / swrn["params"] > 2.0
    assert pulled["params"] == wrn["params"] - sum(2 * 9 * c * c for c in widths) + 3 * 4 * 2
    for r in result["rows"]:
        assert min(r["test_acc"]) > 0.5, r          # chance is 0.1
    # the engine's test accuracy is what evaluating the built soft weights gives
    np.testing.assert_allclose(swrn["soft_acc_recomputed"], swrn["test_acc"], atol=1e-9)
    # the pull makes consecutive blocks coincide: they fold into loops without changing accuracy
    assert pulled["merged_blocks"][0] >= 1 and pulled["fold_warnings"][0] < 3
    assert abs(pulled["folded_acc"][0] - pulled["test_acc"][0]) < 0.005
    # without the pull the shared blocks of a short run stay apart: fold merges nothing and says so
    assert swrn["merged_blocks"] == [0] and swrn["fold_warnings"] == [3]
    assert swrn["folded_acc"] == swrn["test_acc"]
    out = tmp_path / "runs" / "sharing"
    saved = json.load(open(out / "sharing_ci.json"))
    assert saved["table"][1]["ratio"] == pytest.approx(wrn["params"] / swrn["params"])
    assert (out / "sharing_ci.png").stat().st_size > 5_000 and (out / "sharing_ci_lsm.png").stat().st_size > 5_000
    s = np.asarray(pulled["lsm_trained"]["stage1"])
    assert s.shape == (4, 4) and np.allclose(np.diag(s), 1, atol=1e-5)


def test_reduced_extrapolation_looped_net_learns_prefix_sums_above_chance(tmp_path, monkeypatch, load_script):
    extrapolate = load_script("extrapolate")
    monkeypatch.chdir(tmp_path)
    result = extrapolate.main(["--methods", "dt", "--width", "16", "--iters", "8", "--train-sizes", "8",
                               "--test-sizes", "12", "--train-size", "1000", "--test-size", "200",
                               "--epochs", "4", "--batch-size", "24", "--test-iters", "4", "8", "12",
                               "16", "--name", "ci"])
    (dt,) = result["rows"]
    assert dt["val_token_acc"] > 0.6                       # per bit: chance 0.5
    curve8 = {int(k): v for k, v in dt["sizes"]["8"].items()}
    assert sorted(curve8) == [4, 8, 12, 16]                # the test iterations asked for (<= 8 + 8)
    assert max(curve8.values()) > 4 / 2 ** 8               # whole strings: chance 1/256
    assert (tmp_path / "runs" / "extrapolate" / "extrapolate_ci.png").stat().st_size > 5_000


def test_scripts_reject_bad_flags_in_one_line(capsys, load_script):
    from pae.train.cli import run_script

    for name, argv, message in (
            ("extrapolate", ["--iters", "0"], "--iters must be >= 1"),
            ("extrapolate", ["--task", "mazes", "--train-sizes", "10"], "maze sizes must be odd"),
            ("sharing", ["--ks", "0"], "--ks takes ints >= 1 or L"),
            ("sharing", ["--depth", "20"], "depth must be 6n+4"),
            ("bench_sharing", ["--steps", "0"], "--steps must be >= 1")):
        with pytest.raises(SystemExit) as exit_:
            run_script(load_script(name).main, argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err
