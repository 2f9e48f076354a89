"""The one epoch loop: a run is a list of :class:`Phase` objects.

Every method in pae trains in phases: CS searches in rounds with a logit reset between them, rewinds,
then trains a ticket; IMP prunes and rewinds per level; quantization learns bits, snaps to a palette,
then fine-tunes; growth trains a stage, grows the state, trains the next. A method contributes the
pure pieces and a function that builds its phases; :func:`train_phases` owns everything else:

* data iteration (the order of epoch ``e`` is a function of ``(seed, e)`` only), evaluation on every
  split of the :class:`Task`, one compiled train/eval step per distinct phase (a new shape compiles
  once more); while a phase trains, the next phase's steps compile in a background thread for the
  shapes its transition will give (``precompile``), so a run of many shapes (growth stages) does
  not stop at each transition to compile;
* records: one row per epoch tagged with the phase name and index (``metrics.jsonl``/``.csv``), one
  progress bar, ``curves.png`` with the phase boundaries marked, ``summary.json`` (the last row of
  every phase);
* orbax checkpoints at epoch boundaries holding the position (phase, epoch), the state, the kept
  snapshots and the history; calling again with the same ``checkpoint_dir`` resumes anywhere (mid
  phase, at a transition, across a shape change) and ends bit-identical to an uninterrupted run;
* parallel runs: ``runs`` (a pytree with a leading axis of N per-run values) and ``setup(state,
  value) -> state`` give N runs of the same phase list as one ``jax.vmap``-ed program; the per-run
  value must live in the state (a latent node's field, an ``optax.inject_hyperparams`` state).

A phase's ``enter(state, snapshots) -> state`` is a host-side transition at its start (reset logits,
rewind, prune, assign a palette, grow). It must be a pure function of its inputs: a resumed run
replays the transitions before the saved position on placeholder values to recover the state's
structure (``jax.eval_shape`` when the transition is traceable, arrays of zeros otherwise).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent import futures
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from pae import data as pdata
from pae.core import Context, Transform, check_min_int, identity
from pae.train import distributed, metrics as pmetrics
from pae.train.checkpoint import Checkpointer, CheckpointError, DamagedCheckpointError, tree_checksum
from pae.train.compilation import AHEAD_THREAD
from pae.train.state import TrainState, init_variables
from pae.train.step import Distill, make_eval_step, make_train_step

OPTIMIZER_STATES = ("fresh", "keep")
ON_DAMAGED = ("raise", "previous")
ON_DIVERGED = ("raise", "continue")


class TrainingDiverged(RuntimeError):
    """The training loss (or penalty) of an epoch was not finite; nothing of that epoch was kept."""


@dataclasses.dataclass(frozen=True)
class Task:
    """A model and its data: what a run trains and where it evaluates.

    ``evals`` maps a row prefix to a split (``{"val": ..., "test": ...}``); ``example`` is one input
    batch for initialization; ``text`` adds bits per character to the rows.
    """

    model: Any
    train: Any
    evals: Mapping[str, Any]
    train_transform: Any = None
    eval_transform: Any = None
    example: Any = None
    mesh: Any = None
    text: bool = False


_EVAL_SPLITS = (("validation", "val"), ("test", "test"))


def _eval_split_names(eval_splits, available, default: Sequence[str]) -> list:
    """The splits to evaluate: ``eval_splits`` (each must exist), or ``default`` (those that exist)
    when it is None. TypeError for a bare string or non-string names."""
    if eval_splits is None:
        return [s for s in default if s in available]
    if isinstance(eval_splits, (str, bytes)) or not isinstance(eval_splits, Iterable) or not all(
            isinstance(s, str) for s in eval_splits):
        raise TypeError(f"eval_splits must be a sequence of split names such as ('test',), got "
                        f"{eval_splits!r}")
    unknown = [s for s in eval_splits if s not in available]
    if unknown:
        raise ValueError(f"eval_splits names splits the data does not have: {unknown}; available: "
                         f"{sorted(available)}")
    return list(eval_splits)


def make_task(model, data, *, mesh=None, augment: bool | None = None,
              eval_splits: Sequence[str] | None = None) -> Task:
    """A :class:`Task` from a model and a :class:`pae.data.Dataset` or arrays.

    ``data``: a ``Dataset`` (its transforms, ``augment`` as in ``Dataset.transform``), or a mapping
    ``{"train": (inputs, targets), "test": (inputs, targets), ...}`` of in-memory arrays (inputs fed
    to the model as they are). ``eval_splits``: the splits to evaluate, each of which must exist;
    None: a Dataset's ``"validation"`` (if it has one) and ``"test"``, a mapping's every split but
    ``"train"``. ``mesh`` defaults to all devices.
    """
    mesh = distributed.data_mesh() if mesh is None else mesh
    prefixes = dict(_EVAL_SPLITS)
    if isinstance(data, pdata.Dataset):
        names = _eval_split_names(eval_splits, data.splits, ("validation", "test"))
        evals = {prefixes.get(s, s): data[s] for s in names}
        return Task(model, data["train"], evals, data.transform(True, augment), data.transform(False),
                    np.asarray(data.example_inputs()), mesh, data.kind == "text")
    if not isinstance(data, Mapping) or "train" not in data:
        raise TypeError("data must be a pae.data.Dataset or a mapping {'train': (inputs, targets), "
                        f"...}}, got {type(data).__name__}")
    sources = {}
    for split, arrays in data.items():
        if not (isinstance(arrays, (tuple, list)) and len(arrays) == 2):
            raise TypeError(f"data[{split!r}] must be a pair (inputs, targets)")
        sources[split] = pdata.ArraySource({"inputs": np.asarray(arrays[0]),
                                            "targets": np.asarray(arrays[1])})
    names = _eval_split_names(eval_splits, sources, [s for s in sources if s != "train"])
    evals = {prefixes.get(s, s): sources[s] for s in names}
    return Task(model, sources["train"], evals, None, None, sources["train"].arrays["inputs"][:1], mesh)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of training with fixed pieces.

    Args:
      name: tag of the phase's rows.
      epochs: epochs in the phase (0: a transition only, e.g. a final prune).
      optimizer: ``steps_per_epoch -> optax.GradientTransformation``.
      transform: the model sees ``transform.apply(latent, ctx)``; ``penalty`` is added to the loss.
      context: ``epoch_in_phase -> ctx`` (default ``Context.make(key=seed)``, the run's seed); inside
        a step a :class:`pae.Context`'s ``key`` is folded with the step and ``step`` set, so noise differs
        per step without host work.
      enter: ``(state, snapshots) -> state`` at the phase start (pure; see the module doc).
      keep: ``{k: name}``: keep the state after ``k`` epochs of this phase (``0``: right after
        ``enter``; ``epochs``: at its end) as ``snapshots[name]`` for later phases.
      optimizer_state: ``"fresh"``: ``tx.init`` at the phase start; ``"keep"``: carry the state's
        optimizer state (as CS's momentum across rounds; a growing ``enter`` grows it).
      eval_every: evaluate every k epochs and at the phase end; 0: only at the end.
      data_epochs_from: the data order of epoch ``e`` is that of epoch ``data_epochs_from + e``;
        ``None``: the run's epoch counter (every epoch of the run a new order).
      metrics: ``(state, ctx) -> {name: scalar}`` added to each row (jitted; per run when parallel).
      eval_apply: ``(latent, ctx) -> params`` for evaluation (default ``transform.apply``).
      model: the model of this phase (default the task's): a phase whose ``enter`` changes shapes
        (growth) names the model of the new shapes.
      distill: a :class:`pae.train.Distill`: the loss mixes the cross-entropy with distillation
        towards a frozen teacher (a kept snapshot or given arrays; its model defaults to the task's).
        A checkpoint records it (given arrays by checksum); a resume that changes it is refused.
    """

    name: str
    epochs: int
    optimizer: Callable[[int], optax.GradientTransformation]
    transform: Transform = dataclasses.field(default_factory=identity)
    context: Callable[[int], Any] | None = None
    enter: Callable[[TrainState, Mapping[str, TrainState]], TrainState] | None = None
    keep: Mapping[int, str] = dataclasses.field(default_factory=dict)
    optimizer_state: str = "fresh"
    eval_every: int = 1
    data_epochs_from: int | None = None
    metrics: Callable[[TrainState, Any], Mapping[str, jax.Array]] | None = None
    eval_apply: Callable[[Any, Any], Any] | None = None
    model: Any = None
    distill: Distill | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Phase name must be a non-empty string, got {self.name!r}")
        for field in ("epochs", "eval_every"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"Phase {self.name!r}: {field} must be an int >= 0, got {v!r}")
        if not callable(self.optimizer):
            raise TypeError(f"Phase {self.name!r}: optimizer must be a function steps_per_epoch -> "
                            f"optax.GradientTransformation, got {type(self.optimizer).__name__}")
        if not isinstance(self.transform, Transform):
            raise TypeError(f"Phase {self.name!r}: transform must be a pae.Transform, got "
                            f"{type(self.transform).__name__}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"Phase {self.name!r}: optimizer_state must be one of {OPTIMIZER_STATES}, "
                             f"got {self.optimizer_state!r}")
        if self.data_epochs_from is not None and (
                isinstance(self.data_epochs_from, bool) or not isinstance(self.data_epochs_from, (int, np.integer))
                or self.data_epochs_from < 0):
            raise ValueError(f"Phase {self.name!r}: data_epochs_from must be None or an int >= 0, got "
                             f"{self.data_epochs_from!r}")
        if self.distill is not None and not isinstance(self.distill, Distill):
            raise TypeError(f"Phase {self.name!r}: distill must be a pae.train.Distill or None, got "
                            f"{type(self.distill).__name__}")
        for field in ("context", "enter", "metrics", "eval_apply"):
            v = getattr(self, field)
            if v is not None and not callable(v):
                raise TypeError(f"Phase {self.name!r}: {field} must be a function or None, got "
                                f"{type(v).__name__}")
        bad = [k for k in self.keep if not isinstance(k, (int, np.integer)) or not 0 <= k <= self.epochs]
        if bad:
            raise ValueError(f"Phase {self.name!r}: keep epochs must be in [0, epochs={self.epochs}], "
                             f"got {bad}")
        object.__setattr__(self, "keep", dict(self.keep))


class PhasesResult(NamedTuple):
    """``state``: the final state; ``snapshots``: the kept states (host arrays); ``history``: one row
    per epoch; ``workdir``: where the records are (or None)."""

    state: TrainState
    snapshots: dict
    history: list
    workdir: str | None

    def rows(self, phase: str) -> list[dict]:
        """The rows of the phase(s) named ``phase``."""
        return [r for r in self.history if r["phase"] == phase]

    def last(self, phase: str) -> dict:
        """The last row of the phase named ``phase``."""
        rows = self.rows(phase)
        if not rows:
            raise KeyError(f"no rows for phase {phase!r}; phases: "
                           f"{list(dict.fromkeys(r['phase'] for r in self.history))}")
        return rows[-1]


def init_state(model, example, seed: int, init_latent: Callable | None = None) -> TrainState:
    """The state before the first phase: ``model.init`` with ``PRNGKey(seed)`` (split into init,
    latent and state keys), ``init_latent(params, key)`` if given; no optimizer state yet (the first
    phase's optimizer makes it)."""
    init_key, latent_key, state_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    variables = init_variables(model, jnp.asarray(example), init_key)
    params = variables["params"]
    if init_latent is not None:
        params = init_latent(params, latent_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=None, key=state_key)


def host(tree):
    """Host (NumPy) copies of every leaf: survives the donation of the device buffers."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _abstract(tree):
    """Shapes and dtypes as the run holds them: a host-side result's NumPy defaults (float64, a
    Python int) become what ``jax.device_put`` makes of them (float32, int32 without x64)."""
    def spec(x):
        dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
        return jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(dtype))
    return jax.tree.map(spec, tree)


def _device_count(mesh) -> int:
    """Devices a batch is sharded over (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.devices.size)


def _zeros(tree):
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)


def _to_row_value(x):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()


class _Programs:
    """Compiled steps, cached by the phase pieces that define them (rounds of the same method share)."""

    def __init__(self, task: Task, steps_per_epoch: int, batched: bool):
        self.task, self.spe, self.batched = task, steps_per_epoch, batched
        self._cache: dict = {}
        self._lock = threading.RLock()   # the compile-ahead thread builds programs too

    def _get(self, key, build):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = build()
            return self._cache[key]

    def tx(self, phase: Phase) -> optax.GradientTransformation:
        return self._get(("tx", phase.optimizer), lambda: phase.optimizer(self.spe))

    def _vmap(self, fn, in_axes, donate=False):
        return _jit_over_runs(fn, in_axes, self.batched, donate)

    def train_step(self, phase: Phase):
        """``step(state, batch, ctx, *teacher)``: ``teacher`` (the variables of ``phase.distill``'s
        teacher, :func:`_teacher`) only with distillation."""
        model, d = phase.model or self.task.model, phase.distill
        if d is not None:   # the program depends on these, not on the teacher's arrays
            d = dataclasses.replace(d, model=d.model or self.task.model)
            distill_key = (d.weight, d.temperature, d.model, isinstance(d.teacher, str))

        def build():
            t = phase.transform
            takes_mask = "mask" in inspect.signature(type(model).__call__).parameters
            step = make_train_step(model, self.tx(phase), reparam=t.apply, penalty=t.penalty,
                                   donate=False, pass_mask=takes_mask, jit=False, distill=d)
            # a kept snapshot holds one teacher per run; given arrays are every run's teacher
            axes = (0, None, None) if d is None else (0, None, None, 0 if isinstance(d.teacher, str) else None)
            return self._vmap(step, axes, donate=True)
        return self._get(("train", model, phase.transform, phase.optimizer,
                          None if d is None else distill_key), build)

    def eval_step(self, phase: Phase):
        return _eval_program(phase.model or self.task.model, phase.eval_apply or phase.transform.apply,
                             self.batched)

    def opt_init(self, phase: Phase):
        return self._get(("init", phase.optimizer),
                         lambda: jax.jit(jax.vmap(self.tx(phase).init) if self.batched else self.tx(phase).init))

    def metrics(self, phase: Phase):
        return self._get(("metrics", phase.metrics), lambda: self._vmap(phase.metrics, (0, None)))

    def enter(self, phase: Phase):
        """The transition; over parallel runs vmapped, or, when it does not trace (host-side NumPy:
        a palette assignment, a growth step), applied to each run and stacked again."""
        if not self.batched:
            return phase.enter
        return self._get(("enter", phase.enter), lambda: _over_runs(phase))


_HOST_ONLY = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError)


def _over_runs(phase: Phase):
    """``phase.enter`` over the leading run axis of the state and the snapshots: ``jax.vmap`` when
    it traces, else once per run on that run's slice (the runs must come out with one structure)."""
    vmapped, host_side = jax.vmap(phase.enter), []

    def enter(state, snapshots):
        if not host_side:
            try:
                return vmapped(state, snapshots)
            except _HOST_ONLY:
                host_side.append(True)
        n = jax.tree.leaves(state)[0].shape[0]
        outs = [phase.enter(*jax.tree.map(lambda x: x[i], (state, snapshots))) for i in range(n)]
        shapes = {str(jax.tree.map(np.shape, o)) for o in outs}
        if len(shapes) != 1:
            raise ValueError(f"phase {phase.name!r}: its enter gave the parallel runs differently shaped "
                             f"states; runs must share one structure (run them separately)")
        return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *outs)
    return enter


def _jit_over_runs(fn, in_axes, batched: bool, donate: bool = False):
    """``fn`` jitted, vmapped over the leading run axis first when the runs are batched."""
    fn = jax.vmap(fn, in_axes=in_axes) if batched else fn
    return jax.jit(fn, donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=64)
def _eval_program(model, apply, batched: bool):
    """The jitted evaluation step of ``model`` seeing ``apply(latent, ctx)``, shared by every run and
    every :func:`evaluate` call with the same pieces (evaluating checkpoints in a loop compiles once)."""
    return _jit_over_runs(make_eval_step(model, reparam=apply, jit=False), (0, None, None), batched)


def _context(phase: Phase, epoch: int, seed: int = 0):
    """The phase's context at ``epoch``; by default one whose key is ``PRNGKey(seed)`` (the run's
    seed, so that noise drawn from ``ctx.key`` differs between seeds)."""
    return Context.make(key=seed) if phase.context is None else phase.context(epoch)


def _teacher(phase: Phase, snapshots, mesh, abstract: bool = False) -> tuple:
    """``()``, or ``(variables,)`` of the phase's distillation teacher placed as the state is
    (``abstract``: their shapes, for compiling ahead)."""
    if phase.distill is None:
        return ()
    variables = phase.distill.variables(snapshots)
    if abstract:
        return (_replicated_abstract(_abstract(variables), mesh),)
    return (distributed.replicate(variables, mesh),)


def _with_optimizer(programs: _Programs, phase: Phase, state: TrainState) -> TrainState:
    if phase.optimizer_state == "fresh" or state.opt_state is None:
        return state.replace(opt_state=programs.opt_init(phase)(state.params))
    wanted = jax.eval_shape(programs.opt_init(phase), _abstract(state.params))
    if jax.tree.structure(wanted) != jax.tree.structure(state.opt_state) or any(
            np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(wanted))):
        raise ValueError(f"phase {phase.name!r} keeps the optimizer state, but the state carried in does "
                         f"not fit its optimizer on these parameters; grow or rebuild it in enter, or "
                         f"use optimizer_state='fresh'")
    return state


def _enter(programs: _Programs, phase: Phase, state: TrainState, snapshots: dict) -> TrainState:
    if phase.enter is not None:
        state = programs.enter(phase)(state, snapshots)
        if not isinstance(state, TrainState):
            raise TypeError(f"phase {phase.name!r}: enter must return a TrainState, got "
                            f"{type(state).__name__}")
    return _with_optimizer(programs, phase, state)


def _abstract_enter(programs: _Programs, phase: Phase, state, snapshots):
    """The structure after ``phase``'s transition, without computing it (or on zeros if host-side)."""
    try:
        return jax.eval_shape(lambda s, sn: _enter(programs, phase, s, sn), state, snapshots)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
            jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError):
        return _abstract(_enter(programs, phase, _zeros(state), _zeros(snapshots)))


def _replicated_abstract(tree, mesh):
    """Every leaf's shape and dtype, replicated over ``mesh``: the state as the run places it."""
    replicated = distributed.replicated(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)


def _abstract_sharded(tree):
    """Shape, dtype and sharding of every (device) leaf: what a jitted call is compiled for."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _host_device():
    """This process's first CPU device when the default backend is an accelerator, else None (the
    default device: already the host, or JAX has no CPU backend)."""
    if jax.default_backend() == "cpu":
        return None
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def _compile_ahead(programs: _Programs, phase: Phase, state, snapshots, batch, eval_batches,
                   mesh) -> None:
    """Compile ``phase``'s train step, eval step, metrics and fresh optimizer init for the shapes its
    transition will give ``state`` (abstract), so that the phase's first calls find them compiled
    (jax's jit reuses an executable compiled through ``.lower(...).compile()`` for the same shapes
    and shardings).

    Best effort, in a background thread: a transition that cannot be replayed on placeholders, or
    anything else that fails here, only means the phase compiles when it starts, as it would anyway.
    """
    try:
        # a host-side enter is replayed on zeros: on the host's CPU device beside an accelerator,
        # so that the replay never holds a second copy of the state in accelerator memory
        with np.errstate(all="ignore"), jax.default_device(_host_device()):
            entered = _abstract_enter(programs, phase, state, snapshots)
        entered = _replicated_abstract(entered, mesh)
        if phase.optimizer_state == "fresh":   # the transition initializes it from host arrays
            programs.opt_init(phase).lower(_abstract(entered.params)).compile()
        ctx = _context(phase, 0)
        kept = {**snapshots, phase.keep[0]: entered} if 0 in phase.keep else snapshots
        teacher = _teacher(phase, kept, mesh, abstract=True)
        programs.train_step(phase).lower(entered, batch, ctx, *teacher).compile()
        for eval_batch in eval_batches:
            programs.eval_step(phase).lower(entered, eval_batch, ctx).compile()
        if phase.metrics is not None:
            programs.metrics(phase).lower(entered, ctx).compile()
    except Exception:   # noqa: BLE001 - an optimization only; the phase compiles on its own
        pass


def _eval_batch_shapes(task: Task, batch_size: int, mesh) -> list:
    """The abstract batch of every evaluation split (one shape per split: the last batch is padded)."""
    shapes = []
    for source in task.evals.values():
        batch = next(pdata.iterate_batches(source, batch_size, shuffle=False,
                                           augment=task.eval_transform,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count(), clamp=True,
                                           clamp_multiple=_device_count(mesh)), None)
        if batch is not None:
            shapes.append(_abstract_sharded(distributed.shard_batch(batch, mesh)))
    return shapes


def _structure_at(programs, phases, state, position: tuple[int, int]):
    """Abstract ``{"state", "snapshots"}`` of a checkpoint at ``position`` = (phase, epochs done)."""
    state, snapshots = _abstract(state), {}
    for q, phase in enumerate(phases[:position[0] + 1]):
        state = _abstract_enter(programs, phase, state, dict(snapshots))
        for k, name in phase.keep.items():
            if (q, k) <= tuple(position):
                snapshots[name] = state
    return {"state": state, "snapshots": snapshots}


def _check_finite(sums, state: TrainState, phase: Phase, epoch: int, ckpt) -> None:
    """TrainingDiverged when an epoch's loss or penalty sum is not finite (in any run), or when the
    state it ends with holds NaN or Inf (each step's loss is computed before its update, so a last
    update that overflows shows in no loss of the epoch)."""
    bad = [f"the training {key.replace('_sum', '')} is {np.asarray(sums[key], np.float64).tolist()}"
           for key in ("loss_sum", "penalty") if not np.all(np.isfinite(np.asarray(sums[key], np.float64)))]
    if not bad:
        leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(
            {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}))
        bad = [f"{jax.tree_util.keystr(path)} holds NaN or Inf after the epoch's last update"
               for path, x in leaves if np.issubdtype(np.asarray(x).dtype, np.inexact)
               and not np.all(np.isfinite(x))][:1]
    if bad:
        last = ckpt.latest_step() if ckpt else None
        kept = f"the newest checkpoint is step {last} in {ckpt.directory}" if last else "no checkpoint was written"
        raise TrainingDiverged(
            f"phase {phase.name!r}, epoch {epoch + 1}: {bad[0]} (not finite); the run stopped without "
            f"recording or checkpointing this epoch ({kept}). Lower the learning rate, or check the "
            f"data and the transform.")


# Steps the host may dispatch ahead of the devices. Unbounded, the host queues the epoch whenever a
# step takes longer than preparing the next batch, and XLA:CPU with several devices (the forced host
# devices of multi-device tests) can then deadlock: once 32 computations wait per device, a
# cross-device all-reduce waits for a participant that is never launched and XLA aborts the process
# after its 40 s rendezvous timeout (jax 0.10.2, 8 forced devices on 2 cores: a jitted loop with an
# all-reduce completes with 31 steps unfinished and hangs with 33, `python
# experiments/cpu_inflight_deadlock.py`). Two keep the devices fed: the host waits for step k - 2
# while k - 1 and k are queued.
STEPS_IN_FLIGHT = 2


@jax.jit
def _add_sums(total, sums):
    """One program per step for the running metric sums (not one per metric)."""
    return jax.tree.map(jnp.add, total, sums)


def _sum_in_flight(total, sums, pending: deque):
    """``total + sums`` (``sums`` when ``total`` is None); then waits until at most
    :data:`STEPS_IN_FLIGHT` of the totals in ``pending`` are unfinished."""
    total = sums if total is None else _add_sums(total, sums)
    pending.append(total)
    if len(pending) > STEPS_IN_FLIGHT:
        jax.block_until_ready(pending.popleft())
    return total


def _evaluate(eval_step, state, source, batch_size, task, ctx) -> dict:
    total, pending = None, deque()
    for batch in pdata.iterate_batches(source, batch_size, shuffle=False, augment=task.eval_transform,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count(), clamp=True,
                                       clamp_multiple=_device_count(task.mesh)):
        total = _sum_in_flight(total, eval_step(state, distributed.shard_batch(batch, task.mesh), ctx), pending)
    return total


def _summarize(prefix: str, sums, text: bool) -> dict:
    """Means of metric sums; per run (lists) when the sums have a run axis."""
    count = np.maximum(np.asarray(sums["count"], np.float64), 1.0)
    loss = np.asarray(sums["loss_sum"], np.float64) / count
    out = {f"{prefix}_loss": loss, f"{prefix}_acc": np.asarray(sums["correct"], np.float64) / count}
    if text:
        out[f"{prefix}_bpc"] = loss / np.log(2)
    return {k: _to_row_value(v) for k, v in out.items()}


_FINGERPRINT_ROWS = 8


def data_fingerprint(source) -> dict:
    """``{"examples": n, "rows": checksum}`` of a training source: its size and a checksum of up to
    8 evenly spaced raw examples (before augmentation), so a checkpoint of other data is refused."""
    n = len(source)
    if n == 0:
        return {"examples": 0, "rows": None}
    rows = np.unique(np.linspace(0, n - 1, min(n, _FINGERPRINT_ROWS)).astype(np.int64))
    return {"examples": int(n), "rows": tree_checksum(source.take(rows, None))}


def _model_repr(model) -> str:
    """The model's repr on one line without memory addresses (a digest of it when long)."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(repr(model).split()))
    return text if len(text) <= 300 else "digest " + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _identity_of(task: Task, runs, extra) -> dict:
    """What a checkpoint must match to be resumed: model (class and fields), training data, runs
    (the :class:`Checkpointer` keeps it as it reads back from JSON)."""
    ident = {"model": type(task.model).__name__, "model_repr": _model_repr(task.model),
             "data": data_fingerprint(task.train),
             "runs": None if runs is None else int(jax.tree.leaves(runs)[0].shape[0])}
    return {**ident, **(extra or {})}


_FINGERPRINT_KEYS = ("model_repr", "data")


def _accept_unfingerprinted(ckpt: Checkpointer, log) -> None:
    """A directory whose newest checkpoint was written before identities held the model's fields
    and the data's fingerprint resumes without them (saying so): they cannot be checked there."""
    latest = ckpt.latest_step()
    if latest is None:
        return
    try:
        saved = ckpt.read_meta(latest).get("identity")
    except DamagedCheckpointError:   # the resume reports (or skips) it
        return
    if isinstance(saved, dict) and not any(k in saved for k in _FINGERPRINT_KEYS):
        ckpt.identity = {k: v for k, v in ckpt.identity.items() if k not in _FINGERPRINT_KEYS}
        if log:
            log(f"checkpoint {ckpt.directory} step {latest} predates training-data fingerprints: "
                f"resuming without checking the model's fields and the training set")


def _identity_differences(saved, now: dict) -> str:
    """The keys in which two identities differ, e.g. ``"data, model_repr"``."""
    saved = saved if isinstance(saved, dict) else {}
    return ", ".join(sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)))


def _phase_list(phases: Sequence[Phase]) -> list:
    return [[p.name, int(p.epochs)] for p in phases]


def _check_extends(saved: list, phases: Sequence[Phase], where: str, extend_last: bool) -> None:
    """A checkpoint resumes a run whose phase list starts with the saved one (appending is safe);
    ``extend_last``: the saved list's last phase may have fewer epochs than the same-named phase now."""
    now = _phase_list(phases)
    if extend_last and saved and len(now) >= len(saved):
        (name, epochs), (now_name, now_epochs) = saved[-1], now[len(saved) - 1]
        if name == now_name and epochs <= now_epochs:
            saved = saved[:-1] + [[now_name, now_epochs]]
    if now[:len(saved)] != saved:
        first = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
        raise CheckpointError(
            f"checkpoint {where} was written by another phase list: saved phases {saved}, this run "
            f"has {now} (they first differ at index {first}). A run may only append phases to a "
            f"saved one (or, when asked, lengthen its last phase); use another checkpoint directory.")


def _check_teachers(phases: Sequence[Phase]) -> None:
    """A teacher named by ``Distill`` must be a snapshot kept before its phase trains."""
    kept = set()
    for phase in phases:
        d = phase.distill
        here = kept | ({phase.keep[0]} if 0 in phase.keep else set())
        if d is not None and isinstance(d.teacher, str) and d.teacher not in here:
            raise ValueError(f"phase {phase.name!r}: Distill teacher {d.teacher!r} is not a snapshot "
                             f"kept before it (kept: {sorted(here)}); keep it in an earlier phase "
                             f"(keep={{epoch: {d.teacher!r}}}) or pass the teacher's state")
        kept |= set(phase.keep.values())


def _run_count(runs) -> int:
    """N of ``runs``: every leaf an array with the same leading axis of N >= 1."""
    shapes = [np.shape(x) for x in jax.tree.leaves(runs)]
    sizes = {shape[0] if shape else 0 for shape in shapes}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"runs must be a pytree of arrays with one leading axis of N >= 1 runs, got "
                         f"leaf shapes {shapes}")
    return sizes.pop()


def _data_order(seed, batch_size, drop_remainder) -> dict:
    """What fixes the batches of every epoch: a resumed run must use the saved values."""
    return {"seed": int(seed), "batch_size": int(batch_size), "drop_remainder": bool(drop_remainder)}


def _distillation(phases: Sequence[Phase]) -> dict:
    """``{phase: {teacher, weight, temperature}}`` of every distilling phase; ``teacher`` is the
    snapshot's name or a checksum of the given teacher's arrays. A resumed phase must match it."""
    out = {}
    for p in phases:
        d = p.distill
        if d is not None:
            teacher = d.teacher if isinstance(d.teacher, str) else "arrays " + tree_checksum(d.variables())
            out[p.name] = {"teacher": teacher, "weight": float(d.weight),
                           "temperature": float(d.temperature)}
    return out


def _check_distillation(saved: dict | None, now: dict, saved_phases: list, where: str) -> None:
    """The saved phases distill as they did (phases appended since are free)."""
    if saved is None:            # (checkpoints written before it was saved)
        return
    for name, _ in saved_phases:
        if saved.get(name) != now.get(name):
            was, is_ = (_describe_distill(x.get(name)) for x in (saved, now))
            raise CheckpointError(f"checkpoint {where}: phase {name!r} distilled {was}, this run "
                                  f"distills {is_}. Resume with the same Distill or use another directory.")


def _describe_distill(entry: dict | None) -> str:
    if entry is None:
        return "from no teacher"
    teacher = entry["teacher"]
    what = "another teacher's arrays" if teacher.startswith("arrays ") else f"snapshot {teacher!r}"
    return f"from {what} (weight {entry['weight']:g}, temperature {entry['temperature']:g})"


def _resume(ckpt, step, programs, phases, state, mesh, extend_last, data_order, distillation):
    """``(position, state, snapshots, history)`` of checkpoint ``step`` of this run."""
    meta = ckpt.read_meta(step)
    where = f"{ckpt.directory}/{step}"
    if meta.get("identity") != ckpt.identity:
        raise CheckpointError(f"checkpoint {where} belongs to a different run (they differ in "
                              f"{_identity_differences(meta.get('identity'), ckpt.identity)}): saved "
                              f"{meta.get('identity')}, this run is {ckpt.identity}. Use another directory.")
    saved_order = meta.get("data_order", data_order)   # (checkpoints written before it was saved)
    changed = [f"{k}: {saved_order.get(k)!r} -> {v!r}" for k, v in data_order.items()
               if saved_order.get(k) != v]
    if changed:
        raise CheckpointError(f"checkpoint {where} was written by a run with other batches: "
                              f"{', '.join(changed)}. Resume with the saved values or use another "
                              f"directory.")
    _check_extends(meta.get("phases", []), phases, where, extend_last)
    _check_distillation(meta.get("distill"), distillation, meta.get("phases", []), where)
    position = tuple(meta["position"])
    target = _replicated_abstract(_structure_at(programs, phases, state, position), mesh)
    saved, history = ckpt.restore(step, target)
    return position, saved["state"], host(saved["snapshots"]), history


def train_phases(task: Task, phases: Sequence[Phase], state: TrainState, *, batch_size: int,
                 seed: int = 0, eval_batch_size: int | None = None, drop_remainder: bool = False,
                 runs: Any = None, setup: Callable[[TrainState, Any], TrainState] | None = None,
                 workdir: str | os.PathLike | None = None,
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 1,
                 keep_checkpoints: int = 3, identity: Mapping[str, Any] | None = None,
                 extend_last_phase: bool = False, on_damaged_checkpoint: str = "raise",
                 on_diverged: str = "raise", progress: bool = False, log: Callable[[str], None] | None = None,
                 callbacks: Sequence[Callable[[dict, TrainState], None]] = (),
                 title: str = "", precompile: bool = True) -> PhasesResult:
    """Run ``phases`` in order from ``state`` (see :func:`init_state`) on ``task``.

    Args:
      batch_size: global train batch (the last partial batch padded and masked unless
        ``drop_remainder``); ``eval_batch_size`` defaults to it.
      seed: the data order (epoch ``e`` visits the examples in the order of ``(seed, e)``).
      runs, setup: parallel runs: ``runs`` is a pytree of arrays with a leading axis of N;
        ``setup(state, run_value)`` (vmapped) makes each run's initial state. Every phase function
        that touches the state is then vmapped (an ``enter`` that does not trace, e.g. a NumPy
        palette search, runs on each run's slice, and the results are stacked); rows hold one value
        per run.
      workdir: write ``metrics.jsonl``/``.csv``, ``curves.png`` and ``summary.json`` there.
      checkpoint_dir: orbax checkpoints every ``checkpoint_every`` epochs and at every phase end
        (last ``keep_checkpoints`` kept); an existing one is resumed. ``identity``: extra values that
        must match for a checkpoint to be resumed (e.g. the method's config), beside ``seed``,
        ``batch_size``, ``drop_remainder``, the model's fields and the training set's fingerprint
        (:func:`data_fingerprint`). A saved run resumes
        when ``phases`` starts with its phase list (appended phases are safe); ``extend_last_phase``
        also lets its last phase have more epochs now. ``on_damaged_checkpoint``: ``"raise"`` a
        :class:`~pae.train.checkpoint.DamagedCheckpointError` naming the step and item, or
        ``"previous"``: move the damaged step aside (``<step>.damaged``) and resume from the newest
        intact one, saying which.
      on_diverged: when an epoch's training loss or penalty, or the state it ends with, is not
        finite: ``"raise"`` :class:`TrainingDiverged` before the epoch is recorded or checkpointed,
        or ``"continue"`` (sweeps over parallel runs, where some settings are expected to diverge):
        keep training, the diverged runs' values are NaN in their rows (``null`` in the files).
      progress: one progress bar over the run's steps, on stderr and only when it is a terminal.
      log: called with one line per epoch (and on resume). ``callbacks``: ``fn(row, state)`` after
        each epoch's checkpoint.
      precompile: after a phase's first step, compile the next phase's steps in a background
        thread (for the shapes its ``enter`` will give, replayed on placeholders as on resume);
        ``False`` compiles each phase when it starts. Results are the same either way.
    """
    phases = list(phases)
    if not phases:
        raise ValueError("phases must hold at least one Phase")
    for i, p in enumerate(phases):
        if not isinstance(p, Phase):
            raise TypeError(f"phases[{i}] must be a pae.train.Phase, got {type(p).__name__}")
    _check_teachers(phases)
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a pae.train.TrainState (see pae.train.init_state), got "
                        f"{type(state).__name__}")
    eval_batch_size = eval_batch_size or batch_size
    for name, v, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                         ("seed", seed, 0), ("checkpoint_every", checkpoint_every, 0),
                         ("keep_checkpoints", keep_checkpoints, 1)):
        check_min_int(name, v, low)
    if not isinstance(precompile, bool):
        raise TypeError(f"precompile must be a bool, got {type(precompile).__name__}")
    if on_damaged_checkpoint not in ON_DAMAGED:
        raise ValueError(f"on_damaged_checkpoint must be one of {ON_DAMAGED}, got {on_damaged_checkpoint!r}")
    if on_diverged not in ON_DIVERGED:
        raise ValueError(f"on_diverged must be one of {ON_DIVERGED}, got {on_diverged!r}")
    mesh = task.mesh if task.mesh is not None else distributed.data_mesh()
    task = dataclasses.replace(task, mesh=mesh)
    distributed.check_batch_size(batch_size, mesh)
    distributed.check_batch_size(eval_batch_size, mesh, "eval_batch_size")
    spe = pdata.num_batches(len(task.train), batch_size, drop_remainder)
    if spe == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {len(task.train)} training examples and "
                         f"drop_remainder=True leaves no batch")

    if setup is not None and not callable(setup):
        raise TypeError(f"setup must be a function (state, run_value) -> state or None, got "
                        f"{type(setup).__name__}")
    batched = runs is not None
    if batched:
        n = _run_count(runs)
        state = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + jnp.shape(x)), state)
        if setup is not None:
            state = jax.jit(jax.vmap(setup))(state, runs)
    programs = _Programs(task, spe, batched)

    ckpt, data_order, distillation = None, _data_order(seed, batch_size, drop_remainder), {}
    position, snapshots, history = (0, -1), {}, []   # -1: the first phase not entered yet
    if checkpoint_dir is not None:
        ckpt = Checkpointer(checkpoint_dir, _identity_of(task, runs, identity), keep_checkpoints)
        _accept_unfingerprinted(ckpt, log)
        distillation = _distillation(phases)     # (the given teachers' checksums: only to checkpoint)
        while (latest := ckpt.latest_step()) is not None:
            try:
                position, state_, snapshots, history = _resume(ckpt, latest, programs, phases, state,
                                                               mesh, extend_last_phase, data_order,
                                                               distillation)
            except DamagedCheckpointError as err:
                if on_damaged_checkpoint == "raise":
                    raise
                moved = ckpt.quarantine(latest)
                if log:
                    log(f"checkpoint step {latest} is damaged and was moved to {moved}: {err}")
                continue
            state = state_
            if log:
                log(f"resumed from {ckpt.directory} step {latest}: phase {phases[position[0]].name!r}, "
                    f"epoch {position[1]}/{phases[position[0]].epochs}")
            break
    done_epochs = sum(p.epochs for p in phases[:position[0]]) + max(position[1], 0)
    total_epochs = sum(p.epochs for p in phases)
    state = distributed.replicate(state, mesh)

    bar = tqdm(total=total_epochs * spe, initial=done_epochs * spe, file=sys.stderr, leave=False,
               disable=not (progress and sys.stderr.isatty()), desc=title or None)
    ahead = futures.ThreadPoolExecutor(1, thread_name_prefix=AHEAD_THREAD) if precompile else None
    compiling, eval_shapes = None, None   # the next phase's compilation (a Future); eval batch shapes
    try:
        for p in range(position[0], len(phases)):
            phase = phases[p]
            start = position[1] if p == position[0] else -1
            if compiling is not None:   # waiting costs less than compiling the same programs again
                compiling.result()
                compiling = None
            if start == -1:   # the transition into this phase
                state = distributed.replicate(_enter(programs, phase, host(state), snapshots), mesh)
                if 0 in phase.keep:
                    snapshots[phase.keep[0]] = host(state)
                start = 0
            elif start == phase.epochs:
                continue
            train_step, eval_step = programs.train_step(phase), programs.eval_step(phase)
            teacher = _teacher(phase, snapshots, mesh)
            look_ahead = ahead is not None and p + 1 < len(phases) and phases[p + 1].epochs > 0
            for e in range(start, phase.epochs):
                began = time.perf_counter()
                ctx = _context(phase, e, seed)
                data_epoch = done_epochs if phase.data_epochs_from is None else phase.data_epochs_from + e
                sums, pending = None, deque()
                for batch in pdata.iterate_batches(
                        task.train, batch_size, seed=seed, epoch=data_epoch,
                        drop_remainder=drop_remainder, augment=task.train_transform,
                        process_index=jax.process_index(), process_count=jax.process_count()):
                    batch = distributed.shard_batch(batch, mesh)
                    state, m = train_step(state, batch, ctx, *teacher)
                    sums = _sum_in_flight(sums, m, pending)
                    bar.update(1)
                    if look_ahead:   # this phase's step is compiled now; start on the next phase's
                        look_ahead = False
                        if eval_shapes is None:
                            eval_shapes = _eval_batch_shapes(task, eval_batch_size, mesh)
                        current = _abstract(state)
                        kept = {**_abstract(snapshots), **{name: current for name in phase.keep.values()}}
                        compiling = ahead.submit(_compile_ahead, programs, phases[p + 1], current, kept,
                                                 _abstract_sharded(batch), eval_shapes, mesh)
                if on_diverged == "raise":
                    _check_finite(sums, state, phase, e, ckpt)
                done_epochs += 1
                row = {"phase": phase.name, "phase_index": p, "epoch": done_epochs,
                       "phase_epoch": e + 1, **_summarize("train", sums, task.text),
                       "penalty": _to_row_value(np.asarray(sums["penalty"]) / spe)}
                if phase.metrics is not None:
                    row.update({k: _to_row_value(v) for k, v in host(programs.metrics(phase)(
                        state, ctx)).items()})
                last = e + 1 == phase.epochs
                if last or (phase.eval_every and (e + 1) % phase.eval_every == 0):
                    for prefix, source in task.evals.items():
                        row.update(_summarize(prefix, _evaluate(eval_step, state, source,
                                                                eval_batch_size, task, ctx), task.text))
                row["epoch_time"] = time.perf_counter() - began
                history.append(row)
                if e + 1 in phase.keep:
                    snapshots[phase.keep[e + 1]] = host(state)
                if jax.process_index() == 0 and workdir is not None:
                    pmetrics.write_history(os.fspath(workdir), history)
                if log:
                    log(_format_row(row))
                if ckpt and (last or (checkpoint_every and done_epochs % checkpoint_every == 0)):
                    ckpt.save(done_epochs, {"state": state, "snapshots": snapshots}, history,
                              position=[p, e + 1], phases=_phase_list(phases[:p + 1]),
                              data_order=data_order, distill=distillation)
                for callback in callbacks:
                    callback(row, state)
    finally:
        bar.close()
        if ahead is not None:
            ahead.shutdown(wait=False, cancel_futures=True)
        if ckpt:
            ckpt.close()
    if jax.process_index() == 0 and workdir is not None and history:
        _write_records(os.fspath(workdir), history, title)
    return PhasesResult(state, snapshots, history, None if workdir is None else os.fspath(workdir))


def evaluate(task: Task, state: TrainState, *, batch_size: int, phase: Phase | None = None,
             epoch: int = 0, seed: int = 0, runs: bool = False) -> dict:
    """``{prefix}_loss`` and ``{prefix}_acc`` (and ``_bpc`` for text) on every evaluation split of
    ``task``, exactly as :func:`train_phases` (run with ``seed``) evaluates at the end of an epoch of
    ``phase`` (its model, eval transform and the context of ``epoch``; default: the plain model).
    ``runs``: the state has a leading run axis (values become lists)."""
    check_min_int("batch_size", batch_size, 1)
    phase = phase or Phase("evaluate", 0, lambda spe: optax.identity())
    task = task if task.mesh is not None else dataclasses.replace(task, mesh=distributed.data_mesh())
    distributed.check_batch_size(batch_size, task.mesh)
    eval_step = _Programs(task, 1, runs).eval_step(phase)
    ctx = _context(phase, epoch, seed)
    state = distributed.replicate(state, task.mesh)
    out = {}
    for prefix, source in task.evals.items():
        out.update(_summarize(prefix, _evaluate(eval_step, state, source, batch_size, task, ctx), task.text))
    return out


def _format_row(row: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in row.items() if k != "phase_index")


def _write_records(workdir: str, history: list[dict], title: str) -> None:
    pmetrics.write_history(workdir, history)
    pmetrics.plot_history(history, os.path.join(workdir, "curves.png"), title)
    summary = {}
    for row in history:
        summary[f"{row['phase_index']}:{row['phase']}"] = row
    pmetrics.atomic_write(os.path.join(workdir, "summary.json"),
                          json.dumps(pmetrics.json_safe(summary), indent=2, allow_nan=False))


__all__ = ["ON_DAMAGED", "OPTIMIZER_STATES", "Phase", "TrainingDiverged", "PhasesResult", "Task", "evaluate", "host", "init_state",
           "make_task", "train_phases"]
