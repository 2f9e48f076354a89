"""The ticket experiment (experiments/tickets.py) in a reduced setting: it learns and sparsifies."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location("tickets", os.path.join(ROOT, "experiments",
                                                                          "tickets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reduced_ticket_experiment_learns_and_reaches_sparsity(tmp_path):
    tickets = _load()
    result = tickets.main(["--dataset", "digits", "--epochs", "3", "--rounds", "2",
                           "--rewind-epoch", "1", "--milestones",
                           "--s-inits", "0.0", "0.05", "--batch-size", "64", "--lr", "0.05",
                           "--beta-final", "10", "--imp-levels", "2", "--out-dir", str(tmp_path), "--name", "ci"])
    rows = result["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    cs = [r for r in rows if r["method"] == "CS"]
    imp = [r for r in rows if r["method"] == "IMP"]
    reinit = [r for r in rows if r["method"] == "random reinit"]
    assert dense["test_acc"] > 0.8  # chance is 0.1
    assert all(r["test_acc"] > 0.8 for r in cs + imp)
    assert cs[0]["density"] < 0.5 < cs[1]["density"]   # s_init controls the sparsity reached
    assert [round(r["density"], 3) for r in imp] == [1.0, 0.8, 0.64]
    assert len(reinit) == 2 and all(r["epochs"] == 9 for r in cs)
    saved = json.load(open(tmp_path / "tickets_ci.json"))
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "tickets_ci.png").stat().st_size > 10_000
    assert set(saved["targets"]) >= {"cs_90pct_sparse_within_1pt_of_dense",
                                     "cs_at_or_above_imp_at_matched_density", "cs_fewer_epochs_than_imp"}


def test_bad_flags_are_rejected():
    tickets = _load()
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        tickets.main(["--dataset", "digits", "--rounds", "0", "--epochs", "1", "--rewind-epoch", "0"])
