"""The epoch loop: data, model, optimizer, sharding, checkpoints and records, driven by a frozen config.

``run(TrainConfig(...))`` trains and evaluates, writing everything under ``workdir``
(default ``runs/<name>``)::

    config.json     the config of the run
    metrics.jsonl   one row per epoch (also metrics.csv)
    curves.png      loss and accuracy curves
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
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from pae import data as pdata
from pae import models as pmodels
from pae.train import distributed, metrics as pmetrics
from pae.train.checkpoint import Checkpointer
from pae.train.optimizers import NAMES as OPTIMIZERS
from pae.train.optimizers import make_optimizer, make_schedule
from pae.train.state import TrainState, create_train_state
from pae.train.step import Penalty, Reparam, make_eval_step, make_train_step


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


def evaluate(eval_step: Callable, state: TrainState, source, batch_size: int, mesh, transform,
             ctx: Any = None) -> dict[str, float]:
    """Metric sums over a whole split (padded last batch masked out), summed on device."""
    total = None
    for batch in pdata.iterate_batches(source, batch_size, shuffle=False, augment=transform,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        sums = eval_step(state, distributed.shard_batch(batch, mesh), {} if ctx is None else ctx)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return {k: float(v) for k, v in total.items()}


def train_epoch(train_step: Callable, state: TrainState, source, batch_size: int, mesh, *,
                seed: int, epoch: int, drop_remainder: bool = False, transform=None,
                context_fn: Callable[[int], Any] | None = None, progress: bool = False,
                desc: str = "") -> tuple[TrainState, dict]:
    """One pass over ``source`` in the order of ``(seed, epoch)``; returns the state and metric sums.

    ``context_fn(global_step) -> ctx`` gives each step its context (default ``{}``).
    """
    sums = None
    batches = pdata.iterate_batches(
        source, batch_size, seed=seed, epoch=epoch, drop_remainder=drop_remainder,
        augment=transform, process_index=jax.process_index(), process_count=jax.process_count())
    total = pdata.num_batches(len(source), batch_size, drop_remainder)
    bar = tqdm(batches, total=total, disable=not progress, leave=False, desc=desc)
    for batch in bar:
        ctx = {} if context_fn is None else context_fn(int(state.step))
        state, step_metrics = train_step(state, distributed.shard_batch(batch, mesh), ctx)
        sums = step_metrics if sums is None else jax.tree.map(jnp.add, sums, step_metrics)
        if progress and bar.n % 25 == 0:
            bar.set_postfix(loss=f"{float(step_metrics['loss_sum'] / step_metrics['count']):.3f}")
    return state, sums


def count_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def run(config: TrainConfig, *, tx: optax.GradientTransformation | None = None,
        workdir: str | None = None, progress: bool = True, mesh=None,
        init_latent: Callable[[Any, jax.Array], Any] | None = None,
        reparam: Reparam | None = None, penalty: Penalty | None = None,
        eval_reparam: Reparam | None = None,
        context_fn: Callable[[int, int], Any] | None = None,
        callbacks: Sequence[Callable[[int, TrainState, dict], None]] = ()) -> RunResult:
    """Train ``config.model`` on ``config.dataset``; resume from ``workdir`` if it has checkpoints.

    Args:
      tx: an optax transformation that replaces ``config.optimizer`` (its learning rate is its own).
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis (default: all devices).
      init_latent, reparam, penalty, eval_reparam: a compression transform's hooks: what is trained is
        ``init_latent(params, key)``; the model sees ``reparam(latent, ctx)`` in training and
        ``eval_reparam(latent, ctx)`` (default ``reparam``) in evaluation; ``penalty`` is added to the loss.
      context_fn: ``(epoch, global_step) -> ctx`` pytree of arrays passed to every train and eval step
        (traced: a new value never recompiles).
      callbacks: called as ``fn(epoch, state, row)`` after each epoch (and its checkpoint).
    """
    distributed.maybe_initialize_distributed()
    dataset = pdata.load_dataset(config.dataset, data_dir=config.data_dir, val_size=config.val_size,
                                 seed=config.seed, seq_len=config.seq_len)
    kind = pmodels.model_kind(config.model)
    if kind != dataset.kind:
        raise ValueError(f"model {config.model!r} takes {kind} data but dataset "
                         f"{config.dataset!r} is {dataset.kind} data")
    model = pmodels.get_model(config.model, dataset.num_classes, **config.model_kwargs)
    mesh = distributed.data_mesh() if mesh is None else mesh
    eval_batch = config.eval_batch_size or config.batch_size
    distributed.check_batch_size(config.batch_size, mesh)
    distributed.check_batch_size(eval_batch, mesh, "eval_batch_size")

    train_src = dataset["train"]
    steps_per_epoch = pdata.num_batches(len(train_src), config.batch_size, config.drop_remainder)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {len(train_src)} training "
                         f"examples and drop_remainder=True leaves no batch")
    schedule = make_schedule(config.schedule, config.learning_rate, steps_per_epoch, config.epochs,
                             milestones=tuple(config.milestones), decay=config.lr_decay,
                             warmup_epochs=config.warmup_epochs)
    if tx is None:
        tx = make_optimizer(config.optimizer, schedule, weight_decay=config.weight_decay,
                            momentum=config.momentum, reference_lr=config.learning_rate)
    train_tf, eval_tf = dataset.transform(True, config.augment), dataset.transform(False)
    state = create_train_state(model, tx, jnp.asarray(dataset.example_inputs()), config.seed, init_latent)
    num_params = count_params(state.params)
    state = distributed.replicate(state, mesh)
    train_step = make_train_step(model, tx, reparam=reparam, penalty=penalty)
    eval_step = make_eval_step(model, reparam=eval_reparam or reparam)
    context_fn = context_fn or (lambda epoch, step: {})

    workdir = workdir or os.path.join("runs", config.run_name)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_json(), f, indent=2)
    ckpt = None
    history: list[dict] = []
    start = 0
    if config.checkpoint_every:
        identity = {"model": config.model, "dataset": config.dataset, "optimizer": config.optimizer,
                    "model_kwargs": dict(config.model_kwargs), "seed": config.seed}
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), identity, config.keep_checkpoints)
        if (latest := ckpt.latest_step()) is not None:
            state, history = ckpt.restore(latest, state)
            start = latest
            if progress:
                print(f"resumed {workdir} from epoch {latest}")

    text = dataset.kind == "text"
    for epoch in range(start, config.epochs):
        began = time.perf_counter()
        state, sums = train_epoch(
            train_step, state, train_src, config.batch_size, mesh, seed=config.seed, epoch=epoch,
            drop_remainder=config.drop_remainder, transform=train_tf,
            context_fn=lambda step: context_fn(epoch, step), progress=progress,
            desc=f"epoch {epoch + 1}/{config.epochs}")
        row = {"epoch": epoch + 1, "step": int(state.step),
               "lr": float(schedule(int(state.step) - 1)),
               **pmetrics.summarize("train", sums, text),
               "penalty": float(sums["penalty"]) / steps_per_epoch}
        eval_ctx = context_fn(epoch, int(state.step))
        for split, prefix in (("validation", "val"), ("test", "test")):
            if split in dataset.splits:
                row.update(pmetrics.summarize(prefix, evaluate(
                    eval_step, state, dataset[split], eval_batch, mesh, eval_tf, eval_ctx), text))
        row["epoch_time"] = time.perf_counter() - began
        history.append(row)
        if jax.process_index() == 0:
            pmetrics.write_history(workdir, history)
        if progress:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()))
        if ckpt and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs):
            ckpt.save(epoch + 1, state, history)
        for callback in callbacks:
            callback(epoch, state, row)

    if jax.process_index() == 0 and history:
        pmetrics.write_history(workdir, history)
        pmetrics.plot_history(history, os.path.join(workdir, "curves.png"), config.run_name)
        with open(os.path.join(workdir, "final.json"), "w") as f:
            json.dump({**history[-1], "num_params": num_params}, f, indent=2)
    if ckpt:
        ckpt.close()
    return RunResult(state, history, workdir, num_params)
