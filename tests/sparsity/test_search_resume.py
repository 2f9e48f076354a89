"""Ticket searches resume from their orbax checkpoints exactly where an interruption stopped them."""
import dataclasses

import jax
import numpy as np
import pytest

from pae import sparsity as sp
from pae.train import CheckpointError

CFG = sp.SearchConfig(rounds=2, epochs=3, rewind_epoch=2, batch_size=64, lr=0.1, milestones=(2,),
                      beta_final=20.0, lmbda=1e-4, seed=5)


class Interrupted(Exception):
    pass


def _interrupt_after(epochs):
    """A callback that makes the driver die after ``epochs`` epochs of this call (their checkpoint
    written)."""
    calls = {"n": 0}

    def callback(row, state):
        calls["n"] += 1
        if calls["n"] == epochs:
            raise Interrupted

    return [callback]


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.mark.parametrize("s_init", [-0.02, [-0.02, 0.03]], ids=["single", "vmapped"])
def test_interrupted_cs_search_resumes_to_the_uninterrupted_result(task, tmp_path, monkeypatch, s_init):
    full = sp.cs_search(task, CFG, s_init)
    ckpt = tmp_path / "cs"
    # dies in epoch 1 (before the rewind point), then in epoch 4 (after the rewind point and the
    # between-round reset), then finishes
    # dies after epoch 1 (before the rewind point), after epoch 4 (past the rewind point and the
    # between-round reset) and after epoch 6 (the search done, the ticket not entered), then finishes
    for epochs in (1, 3, 2):
        with pytest.raises(Interrupted):
            sp.cs_search(task, CFG, s_init, checkpoint_dir=ckpt, callbacks=_interrupt_after(epochs))
    resumed = sp.cs_search(task, CFG, s_init, checkpoint_dir=ckpt)
    _assert_trees_equal(resumed.searched, full.searched)
    _assert_trees_equal(resumed.rewind, full.rewind)
    _assert_trees_equal(resumed.ticket, full.ticket)
    assert resumed.history == full.history and len(full.history) == CFG.rounds
    assert resumed.ticket_row == full.ticket_row
    np.testing.assert_array_equal(resumed.densities, full.densities)


def test_cs_checkpoints_of_another_search_are_refused(task, tmp_path):
    sp.cs_search(task, sp.SearchConfig(**{**vars(CFG), "rounds": 1}), -0.02, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="different run"):
        sp.cs_search(task, sp.SearchConfig(**{**vars(CFG), "rounds": 1}), 0.05, checkpoint_dir=tmp_path)


def test_interrupted_imp_resumes_and_extends(task, tmp_path):
    cfg = sp.SearchConfig(rounds=1, epochs=2, rewind_epoch=1, batch_size=64, lr=0.1, milestones=(), seed=2)
    full = sp.imp_search(task, cfg, levels=3)
    with pytest.raises(Interrupted):  # dies in the middle of level 1
        sp.imp_search(task, cfg, levels=2, checkpoint_dir=tmp_path, callbacks=_interrupt_after(3))
    resumed = sp.imp_search(task, cfg, levels=2, checkpoint_dir=tmp_path)
    assert resumed == full[:3]
    # nothing left to train: the saved rows come back without a single epoch
    assert sp.imp_search(task, cfg, levels=2, checkpoint_dir=tmp_path,
                         callbacks=_interrupt_after(1)) == full[:3]
    assert sp.imp_search(task, cfg, levels=3, checkpoint_dir=tmp_path) == full  # one more level
    with pytest.raises(CheckpointError, match="another phase list"):  # fewer levels: not this run
        sp.imp_search(task, cfg, levels=1, checkpoint_dir=tmp_path)


def test_a_cs_checkpoint_of_other_training_data_is_refused(task, tmp_path):
    """Same model, config and shapes, other training examples: the resume is refused, not mixed."""
    cfg = sp.SearchConfig(**{**vars(CFG), "rounds": 1})
    with pytest.raises(Interrupted):
        sp.cs_search(task, cfg, -0.02, ticket=False, checkpoint_dir=tmp_path, callbacks=_interrupt_after(1))
    other = dataclasses.replace(task, train=task.train.subset(np.roll(np.arange(len(task.train)), 1)))
    with pytest.raises(CheckpointError, match="different run \\(they differ in data\\)"):
        sp.cs_search(other, cfg, -0.02, ticket=False, checkpoint_dir=tmp_path)
    resumed = sp.cs_search(task, cfg, -0.02, ticket=False, checkpoint_dir=tmp_path)
    _assert_trees_equal(resumed.searched, sp.cs_search(task, cfg, -0.02, ticket=False).searched)
