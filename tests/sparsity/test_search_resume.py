"""Ticket searches resume from their orbax checkpoints exactly where an interruption stopped them."""
import jax
import numpy as np
import pytest

from pae import sparsity as sp
from pae.sparsity import search as search_mod
from pae.train import CheckpointError

CFG = sp.SearchConfig(rounds=2, epochs=3, rewind_epoch=2, batch_size=64, lr=0.1, milestones=(2,),
                      beta_final=20.0, lmbda=1e-4, seed=5)


class Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, epochs):
    """Make the driver die when it starts its ``epochs + 1``-th epoch of this call."""
    calls = {"n": 0}
    original = search_mod._epoch

    def epoch(*args, **kwargs):
        if calls["n"] == epochs:
            raise Interrupted
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(search_mod, "_epoch", epoch)


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.mark.parametrize("s_init", [-0.02, [-0.02, 0.03]], ids=["single", "vmapped"])
def test_interrupted_cs_search_resumes_to_the_uninterrupted_result(task, tmp_path, monkeypatch, s_init):
    full = sp.cs_search(task, CFG, s_init)
    ckpt = tmp_path / "cs"
    # dies in epoch 1 (before the rewind point), then in epoch 4 (after the rewind point and the
    # between-round reset), then finishes
    for epochs in (1, 3):
        with monkeypatch.context() as m:
            _interrupt_after(m, epochs)
            with pytest.raises(Interrupted):
                sp.cs_search(task, CFG, s_init, checkpoint_dir=ckpt)
    resumed = sp.cs_search(task, CFG, s_init, checkpoint_dir=ckpt)
    _assert_trees_equal(resumed.latent, full.latent)
    _assert_trees_equal(resumed.rewind_params, full.rewind_params)
    _assert_trees_equal(resumed.rewind_batch_stats, full.rewind_batch_stats)
    assert resumed.history == full.history and len(full.history) == CFG.rounds
    np.testing.assert_array_equal(resumed.densities, full.densities)


def test_cs_checkpoints_of_another_search_are_refused(task, tmp_path):
    sp.cs_search(task, sp.SearchConfig(**{**vars(CFG), "rounds": 1}), -0.02, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="different run"):
        sp.cs_search(task, sp.SearchConfig(**{**vars(CFG), "rounds": 1}), 0.05, checkpoint_dir=tmp_path)


def test_interrupted_imp_resumes_and_extends(task, tmp_path, monkeypatch):
    cfg = sp.SearchConfig(rounds=1, epochs=2, rewind_epoch=1, batch_size=64, lr=0.1, milestones=(), seed=2)
    full = sp.imp_search(task, cfg, levels=3)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)  # dies in the middle of level 1
        with pytest.raises(Interrupted):
            sp.imp_search(task, cfg, levels=2, checkpoint_dir=tmp_path)
    resumed = sp.imp_search(task, cfg, levels=2, checkpoint_dir=tmp_path)
    assert resumed == full[:3]
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)  # nothing left to train: the saved rows come back
        assert sp.imp_search(task, cfg, levels=1, checkpoint_dir=tmp_path) == full[:2]
    assert sp.imp_search(task, cfg, levels=3, checkpoint_dir=tmp_path) == full  # one more level
