"""Plain training from a frozen config: the one-phase case of the engine (:mod:`pae.train.engine`).

``run(TrainConfig(...))`` trains and evaluates, writing everything under ``workdir``
(default ``runs/<name>``)::

    config.json     the config of the run
    metrics.jsonl   one row per epoch (also metrics.csv)
    curves.png      loss and accuracy curves
    summary.json    the last row of the phase
    final.json      the last row plus the parameter count
    checkpoints/    orbax checkpoints (every ``checkpoint_every`` epochs, last ``keep_checkpoints``)

Running the same config again in the same ``workdir`` resumes from the newest checkpoint and produces
the same final parameters as an uninterrupted run: the data order, augmentation and dropout keys are
functions of ``(seed, epoch, step)`` only.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pae import data as pdata
from pae import models as pmodels
from pae.core import Transform, identity
from pae.train import distributed
from pae.train.engine import Phase, init_state, make_task, train_phases
from pae.train.optimizers import NAMES as OPTIMIZERS
from pae.train.optimizers import make_optimizer, make_schedule
from pae.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults: LeNet-5 on 5,000 embedded MNIST digits."""

    model: str = "lenet5"
    dataset: str = "mnist_subset"
    optimizer: str = "nesterov"
    learning_rate: float = 0.05
    schedule: str = "cosine"            # constant | cosine | step
    milestones: tuple[int, ...] = ()    # epochs at which "step" multiplies the lr by lr_decay
    lr_decay: float = 0.1
    warmup_epochs: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 5
    batch_size: int = 128
    eval_batch_size: int = 0            # 0: same as batch_size
    drop_remainder: bool = False        # False: the last partial batch is padded and masked
    augment: bool | None = None         # None: the data set's default (crop+flip for CIFAR)
    val_size: int = 0                   # examples held out of train for validation
    seq_len: int = 128                  # text data sets: window length
    seed: int = 0
    data_dir: str | None = None
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str = ""                      # run name; default "<model>-<dataset>"
    checkpoint_every: int = 1           # epochs; 0 disables checkpoints
    keep_checkpoints: int = 3

    def __post_init__(self):
        positive = ("epochs", "batch_size", "keep_checkpoints")
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        for field in ("eval_batch_size", "checkpoint_every", "val_size", "warmup_epochs"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if not np.isfinite(self.learning_rate) or self.learning_rate < 0:
            raise ValueError(f"learning_rate must be finite and >= 0, got {self.learning_rate}")
        pmodels.model_kind(self.model)  # unknown model -> ValueError naming the known ones

    @property
    def run_name(self) -> str:
        return self.name or f"{self.model}-{self.dataset.replace(':', '_').replace('/', '_')}"

    def to_json(self) -> dict:
        return {k: (dict(v) if isinstance(v, Mapping) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class RunResult:
    state: TrainState
    history: list[dict]
    workdir: str
    num_params: int

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def count_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def run(config: TrainConfig, *, transform: Transform | None = None,
        tx: optax.GradientTransformation | None = None, context: Callable[[int], Any] | None = None,
        workdir: str | None = None, progress: bool = True, mesh=None,
        callbacks: Sequence[Callable[[dict, TrainState], None]] = ()) -> RunResult:
    """Train ``config.model`` on ``config.dataset``: the one-phase case of :func:`train_phases`.

    Resumes from ``workdir`` if it has checkpoints.

    Args:
      transform: a compression :class:`pae.Transform` (its latent is what is trained; the model sees
        ``transform.apply``; its ``penalty`` is added to the loss). Default: plain training.
      tx: an optax transformation that replaces ``config.optimizer`` (its learning rate is its own).
      context: ``epoch -> ctx`` for the transform (traced: a new value never recompiles).
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis (default: all devices).
      callbacks: called as ``fn(row, state)`` after each epoch (and its checkpoint).
    """
    distributed.maybe_initialize_distributed()
    dataset = pdata.load_dataset(config.dataset, data_dir=config.data_dir, val_size=config.val_size,
                                 seed=config.seed, seq_len=config.seq_len)
    kind = pmodels.model_kind(config.model)
    if kind != dataset.kind:
        raise ValueError(f"model {config.model!r} takes {kind} data but dataset "
                         f"{config.dataset!r} is {dataset.kind} data")
    model = pmodels.get_model(config.model, dataset.num_classes, **config.model_kwargs)
    task = make_task(model, dataset, mesh=mesh, augment=config.augment)
    steps_per_epoch = pdata.num_batches(len(task.train), config.batch_size, config.drop_remainder)
    schedule = make_schedule(config.schedule, config.learning_rate, max(steps_per_epoch, 1),
                             config.epochs, milestones=tuple(config.milestones), decay=config.lr_decay,
                             warmup_epochs=config.warmup_epochs)

    def optimizer(spe):
        if tx is not None:
            return tx
        return make_optimizer(config.optimizer, schedule, weight_decay=config.weight_decay,
                              momentum=config.momentum, reference_lr=config.learning_rate)

    def lr(state, ctx):
        return {"lr": schedule(state.step - 1)}

    transform = transform or identity()
    phase = Phase("train", config.epochs, optimizer, transform, context, metrics=lr)
    state = init_state(model, task.example, config.seed, transform.init)
    num_params = count_params(state.params)

    workdir = workdir or os.path.join("runs", config.run_name)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_json(), f, indent=2)
    identity_ = {"model_name": config.model, "dataset": config.dataset, "optimizer": config.optimizer,
                 "model_kwargs": dict(config.model_kwargs), "seed": config.seed}
    result = train_phases(
        task, [phase], state, batch_size=config.batch_size, seed=config.seed,
        eval_batch_size=config.eval_batch_size or None, drop_remainder=config.drop_remainder,
        workdir=workdir,
        checkpoint_dir=os.path.join(workdir, "checkpoints") if config.checkpoint_every else None,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
        identity=identity_, progress=progress, log=print if progress else None, callbacks=callbacks,
        title=config.run_name)
    if jax.process_index() == 0 and result.history:
        with open(os.path.join(workdir, "final.json"), "w") as f:
            json.dump({**result.history[-1], "num_params": num_params}, f, indent=2)
    return RunResult(result.state, result.history, workdir, num_params)
