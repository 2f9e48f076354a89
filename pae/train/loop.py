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
functions of ``(seed, epoch, step)`` only. Running it with a changed config is refused before anything
is written, naming each changed field (``learning_rate: 0.05 -> 0.1``); a larger ``epochs`` is
accepted with ``extend=True`` (``--extend``), which trains the saved run on with the lr schedule
rebuilt for the new length.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax

from pae import data as pdata
from pae import models as pmodels
from pae.core import Transform, identity
from pae.train import distributed, metrics as pmetrics
from pae.train.checkpoint import CheckpointError
from pae.train.engine import Phase, init_state, make_task, train_phases
from pae.train.optimizers import NAMES as OPTIMIZERS
from pae.train.optimizers import SCHEDULES, make_optimizer, make_schedule
from pae.train.state import TrainState


def _field(default=dataclasses.MISSING, help: str = "", choices=None, *, default_factory=dataclasses.MISSING,
           validate: bool = True):
    """A config field with its command-line help and choices (the CLI reads them from here).

    ``choices``: the allowed values; ``validate=False`` shows them in the help without restricting
    the flag (model and data set names have patterns: ``wrn<d>_<k>``, ``text:PATH``).
    """
    metadata = {"help": help, "choices": None if choices is None else tuple(choices),
                "validate_choices": validate}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


#: Fields that a resumed run may change (they say where things are or how often to save, not what
#: is trained). ``epochs`` may grow with ``extend=True``; every other change is refused.
SAFE_CHANGES = ("data_dir", "checkpoint_every", "keep_checkpoints", "name")


class ConfigChangedError(CheckpointError):
    """A run directory holds a run of another config: resuming it with this one is refused."""


def _check_int(field: str, value, low: int) -> None:
    """TypeError unless ``value`` is an int (not a bool); ValueError below ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{field} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{field} must be >= {low}, got {value}")


def _check_real(field: str, value, low: float, high: float) -> None:
    """A real number in ``[low, high)`` (finite); names ``field`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{field} must be a number, got {value!r}")
    if not (np.isfinite(value) and low <= value < high):
        allowed = f">= {low:g} and finite" if high == np.inf else f"in [{low:g}, {high:g})"
        raise ValueError(f"{field} must be {allowed}, got {value}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults: LeNet-5 on 5,000 embedded MNIST digits.

    Each field's ``metadata`` holds its command-line ``help`` and ``choices``
    (``python experiments/train.py --help``).
    """

    model: str = _field("lenet5", "model (pae.models.get_model)", pmodels.NAMES, validate=False)
    dataset: str = _field("mnist_subset", "data set (pae.data.load_dataset); tfds ones must be "
                          "prepared once", pdata.NAMES, validate=False)
    optimizer: str = _field("nesterov", "optimizer (pae.train.optimizers)", OPTIMIZERS)
    learning_rate: float = _field(0.05, "peak learning rate")
    schedule: str = _field("cosine", "learning-rate schedule over the run (per step; step: per epoch)",
                           SCHEDULES)
    milestones: tuple[int, ...] = _field((), "epochs at which the step schedule multiplies the lr "
                                         "by lr_decay")
    lr_decay: float = _field(0.1, "factor of the step schedule at each milestone")
    warmup_epochs: int = _field(0, "epochs of linear lr warm-up from 0")
    momentum: float = _field(0.9, "momentum (sgd family, csgd)")
    weight_decay: float = _field(5e-4, "weight decay (coupled L2 unless the optimizer's name ends in w)")
    epochs: int = _field(5, "epochs to train (a finished run grows only with --extend)")
    batch_size: int = _field(128, "global training batch (split over all devices)")
    eval_batch_size: int = _field(0, "evaluation batch; 0: the training batch")
    drop_remainder: bool = _field(False, "drop the last partial training batch (false: pad and mask it)",
                                  (True, False))
    augment: bool | None = _field(None, "training augmentation; none: the data set's default "
                                  "(crop+flip for CIFAR and ImageNet)", (True, False))
    val_size: int = _field(0, "training examples held out for validation")
    seq_len: int = _field(128, "text data sets: window length")
    seed: int = _field(0, "initialization and data order")
    data_dir: str | None = _field(None, "tfds data directory; none: $TFDS_DATA_DIR or "
                                  "~/tensorflow_datasets")
    model_kwargs: Mapping[str, Any] = _field(help="JSON object of model keyword arguments, e.g. "
                                             "'{\"dropout\": 0.3}'", default_factory=dict)
    name: str = _field("", "run name; empty: <model>-<dataset>")
    checkpoint_every: int = _field(1, "checkpoint every N epochs (and at the end); 0: never")
    keep_checkpoints: int = _field(3, "checkpoints kept (the newest)")

    def __post_init__(self):
        for field, low in (("epochs", 1), ("batch_size", 1), ("keep_checkpoints", 1), ("seq_len", 1),
                           ("eval_batch_size", 0), ("checkpoint_every", 0), ("val_size", 0),
                           ("warmup_epochs", 0), ("seed", 0)):
            _check_int(field, getattr(self, field), low)
        for field, low, high in (("momentum", 0.0, 1.0), ("weight_decay", 0.0, np.inf),
                                 ("lr_decay", 0.0, np.inf)):
            _check_real(field, getattr(self, field), low, high)
        if self.lr_decay == 0:
            raise ValueError(f"lr_decay must be > 0, got {self.lr_decay}")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be below epochs={self.epochs} (the lr would never "
                             f"reach learning_rate), got {self.warmup_epochs}")
        self._check_milestones()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if not np.isfinite(self.learning_rate) or self.learning_rate < 0:
            raise ValueError(f"learning_rate must be finite and >= 0, got {self.learning_rate}")
        pmodels.model_kind(self.model)  # unknown model -> ValueError naming the known ones

    def _check_milestones(self) -> None:
        """Milestones are increasing epochs in (0, epochs), used only by the step schedule."""
        if isinstance(self.milestones, (str, bytes)) or np.ndim(self.milestones) != 1:
            raise TypeError(f"milestones must be a sequence of epochs, got {self.milestones!r}")
        if len(self.milestones) and self.schedule != "step":
            raise ValueError(f"milestones {tuple(self.milestones)} have no effect with schedule="
                             f"{self.schedule!r}; use schedule='step' or no milestones")
        for m in self.milestones:
            _check_int("milestones", m, 1)
        if not all(0 < m < self.epochs for m in self.milestones) or \
                list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be increasing epochs in (0, epochs={self.epochs}), got "
                             f"{tuple(self.milestones)}")

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


def _saved_run(workdir: str) -> bool:
    """Whether ``workdir`` holds a run to resume or records of one (a checkpoint step or metrics);
    read only."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    return steps or os.path.isfile(os.path.join(workdir, "metrics.jsonl"))


def _plain(value):
    return json.loads(json.dumps(value))


def check_resume(config: TrainConfig, workdir: str, *, extend: bool = False) -> dict | None:
    """Refuse to continue the run in ``workdir`` with a changed config; reads, never writes.

    Returns the saved config (``None`` if ``workdir`` holds no run or no ``config.json``). Raises
    :class:`ConfigChangedError` naming each changed field as ``field: old -> new``. Allowed: the
    fields in :data:`SAFE_CHANGES`, and a larger ``epochs`` with ``extend=True`` (the run continues
    from its saved epoch; the lr schedule is rebuilt for the new length).
    """
    path = os.path.join(workdir, "config.json")
    if not (os.path.isfile(path) and _saved_run(workdir)):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); restore it or use another run "
                              f"directory") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} does not hold a config (a JSON object); restore it or use "
                              f"another run directory")
    now = _plain(config.to_json())
    defaults = _plain(TrainConfig(model=config.model).to_json())
    changed, notes = [], []
    for key in list(now) + [k for k in saved if k not in now]:
        old = saved.get(key, defaults.get(key))
        new = now.get(key, "(absent)")
        if old == new or key in SAFE_CHANGES:
            continue
        if key == "epochs" and isinstance(old, int) and new > old:
            if extend:
                continue
            notes.append(f"to train the saved run on to {new} epochs pass extend=True (--extend); "
                         f"the lr schedule is rebuilt for {new} epochs")
        elif key == "epochs" and isinstance(old, int):
            notes.append("a run cannot be shortened")
        changed.append(f"{key}: {old!r} -> {new!r}")
    if changed:
        hint = "; ".join(notes + [f"resume with the saved config ({path}) or use another run "
                                  f"directory"])
        raise ConfigChangedError(f"run directory {workdir} holds a run with another config: "
                                 f"{', '.join(changed)}. Nothing was changed; {hint}.")
    return saved


def _print_line(line: str) -> None:
    print(line, flush=True)


def run(config: TrainConfig, *, transform: Transform | None = None,
        tx: optax.GradientTransformation | None = None, context: Callable[[int], Any] | None = None,
        workdir: str | None = None, progress: bool = True, quiet: bool = False,
        log: Callable[[str], None] | None = _print_line, extend: bool = False,
        resume_intact: bool = False, mesh=None,
        callbacks: Sequence[Callable[[dict, TrainState], None]] = ()) -> RunResult:
    """Train ``config.model`` on ``config.dataset``: the one-phase case of :func:`train_phases`.

    Resumes from ``workdir`` if it has checkpoints. A run directory that holds a run of another config
    is refused before anything is written (:class:`ConfigChangedError` names each changed field with
    its old and new value), except for :data:`SAFE_CHANGES` and, with ``extend=True``, a larger
    ``epochs``: the saved run trains on from its saved epoch to the new count, and its lr schedule is
    rebuilt for the new length (a cosine schedule, for one, rises again to where the longer schedule
    is at that step). A finished run cannot be shortened.

    Args:
      transform: a compression :class:`pae.Transform` (its latent is what is trained; the model sees
        ``transform.apply``; its ``penalty`` is added to the loss). Default: plain training.
      tx: an optax transformation that replaces ``config.optimizer`` (its learning rate is its own).
      context: ``epoch -> ctx`` for the transform (traced: a new value never recompiles).
      progress: the progress bar (on stderr, only when it is a terminal).
      log: called with one line per epoch and "resumed from ..." (default: print to stdout, flushed,
        whatever ``progress`` says); ``None`` or ``quiet=True``: no lines (``quiet`` also hides the bar).
      extend: allow a larger ``epochs`` than the saved run's (see above).
      resume_intact: when the newest checkpoint is damaged, move it aside and resume from the newest
        intact one, saying which (default: refuse with :class:`DamagedCheckpointError`).
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis (default: all devices).
      callbacks: called as ``fn(row, state)`` after each epoch (and its checkpoint).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a pae.train.TrainConfig, got {type(config).__name__}")
    if log is not None and not callable(log):
        raise TypeError(f"log must be a function of one line (str) or None, got {type(log).__name__}")
    workdir = os.fspath(workdir) if workdir is not None else os.path.join("runs", config.run_name)
    saved = check_resume(config, workdir, extend=extend)   # before anything is written
    fresh = not _saved_run(workdir)
    os.makedirs(workdir, exist_ok=True)   # an unwritable run directory fails here, before the work
    distributed.maybe_initialize_distributed()
    dataset = pdata.load_dataset(config.dataset, data_dir=config.data_dir, val_size=config.val_size,
                                 seed=config.seed, seq_len=config.seq_len)
    kind = pmodels.model_kind(config.model)
    if kind != dataset.kind:
        raise ValueError(f"model {config.model!r} takes {kind} data but dataset "
                         f"{config.dataset!r} is {dataset.kind} data")
    try:
        model = pmodels.get_model(config.model, dataset.num_classes, **config.model_kwargs)
    except TypeError as err:   # an unknown or missing keyword of the model's constructor
        raise ValueError(f"model_kwargs {dict(config.model_kwargs)} do not fit model {config.model!r}: "
                         f"{err}") from err
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

    config_text = json.dumps(config.to_json(), indent=2)
    main_process = jax.process_index() == 0

    def write_config():
        if main_process:
            pmetrics.atomic_write(os.path.join(workdir, "config.json"), config_text)

    # a new run writes its config now; a resumed one once the engine has accepted the checkpoint
    # (a refused run changes nothing in the run directory)
    pending = [not fresh and (saved is None or _plain(saved) != _plain(config.to_json()))]
    if fresh:
        write_config()

    def engine_log(line: str) -> None:
        if pending[0]:
            pending[0] = False
            write_config()
        if log is not None and not quiet:
            log(line)

    identity_ = {"model_name": config.model, "dataset": config.dataset, "optimizer": config.optimizer,
                 "model_kwargs": dict(config.model_kwargs), "seed": config.seed}
    result = train_phases(
        task, [phase], state, batch_size=config.batch_size, seed=config.seed,
        eval_batch_size=config.eval_batch_size or None, drop_remainder=config.drop_remainder,
        workdir=workdir,
        checkpoint_dir=os.path.join(workdir, "checkpoints") if config.checkpoint_every else None,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
        identity=identity_, progress=progress and not quiet, log=engine_log, callbacks=callbacks,
        title=config.run_name, extend_last_phase=extend,
        on_damaged_checkpoint="previous" if resume_intact else "raise")
    if pending[0]:
        write_config()
    if main_process and result.history:
        pmetrics.atomic_write(os.path.join(workdir, "final.json"),
                              json.dumps({**result.history[-1], "num_params": num_params}, indent=2))
    return RunResult(result.state, result.history, workdir, num_params)
