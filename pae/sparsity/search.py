"""Ticket search drivers built from the pure pieces: CS (sequential or vmapped over ``s_init``), IMP,
ticket training from the rewind point, random re-initialization and the dense baseline.

Protocol (official CS code, ``main.py``): R rounds of E epochs; beta restarts at 1 every round and
follows :func:`~pae.sparsity.cs.temperature_schedule`; the lr schedule is indexed by the epoch *within*
the round and applies to both optimizers; momentum persists across rounds; weights are not rewound
between rounds; between rounds the logits are reset (:func:`~pae.sparsity.cs.reset_logits`). The
rewind point is the state (weights, BN params, BN batch statistics) at the start of epoch
``rewind_epoch`` of round 0. The ticket is the hard mask applied to the rewound weights, trained for E
epochs with a fresh weight optimizer; the mask is frozen.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pae import data as pdata
from pae.core import Context, role_optimizer, select as pselect
from pae.train import distributed
from pae.train.checkpoint import Checkpointer
from pae.train.state import TrainState, create_train_state, init_variables
from pae.train.step import make_eval_step, make_train_step
from pae.sparsity import cs as pcs
from pae.sparsity import imp as pimp
from pae.sparsity.masks import _check_shape, _zip_masked, density, fixed_masks, mask_tree, masked_count

#: The official CIFAR-10 ResNet-20 protocol.
PAPER_CIFAR = dict(rounds=3, epochs=85, rewind_epoch=2, batch_size=128, lr=0.1, momentum=0.9,
                   weight_decay=1e-4, milestones=(56, 71), beta_final=200.0, lmbda=1e-8)


TICKET_MASKS = ("finalize", "binary")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Ticket-search hyperparameters. Defaults: the CIFAR-10 protocol of the official CS code
    (:data:`PAPER_CIFAR`), except the between-round ``reset``, which defaults to the paper's rule
    (the issue's choice; ``reset="code"`` gives the official script's)."""

    rounds: int = 3
    epochs: int = 85                    # per search round, per IMP round and for every ticket
    rewind_epoch: int = 2               # rewind to the start of this epoch of round 0
    batch_size: int = 128
    lr: float = 0.1
    mask_lr: float | None = None        # None: same as lr
    momentum: float = 0.9
    weight_decay: float = 1e-4          # coupled L2 on weights only (never on mask logits)
    milestones: tuple[int, ...] | None = None  # lr decays at these epochs of each round; None: at
                                               # round(E*56/85), round(E*71/85) (the official 56, 71)
    lr_decay: float = 0.1
    beta_final: float = 200.0
    lmbda: float = 1e-8
    reset: str = "paper"                # between rounds: "paper" min(beta_T*s, s_init) | "code" min(s, s_init)
    scaled: bool = True                 # keep the official 1/sigmoid(s_init) mask scale
    ticket_mask: str = "finalize"       # "finalize": the transform's hard mask (scaled if scaled);
                                        # "binary": 1[s > 0] (for nets without BN, see cs_ticket)
    prune_rate: float = 0.2             # IMP
    prune_scope: str = "global"         # IMP: "global" | "layer"
    seed: int = 0

    def __post_init__(self):
        for name in ("rounds", "epochs", "batch_size", "rewind_epoch", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {v!r}")
        for name in ("rounds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.milestones is not None:
            object.__setattr__(self, "milestones", tuple(self.milestones))
            if not all(isinstance(m, numbers.Integral) and 0 < m < self.epochs for m in self.milestones):
                raise ValueError(f"milestones must be epochs in (0, epochs={self.epochs}), got "
                                 f"{self.milestones}")
        if not np.isfinite(self.lr_decay) or self.lr_decay <= 0:
            raise ValueError(f"lr_decay must be finite and > 0, got {self.lr_decay}")
        if not 0 <= self.rewind_epoch < self.epochs:
            raise ValueError(f"rewind_epoch must be in [0, epochs={self.epochs}), got {self.rewind_epoch}")
        for name in ("lr", "momentum", "weight_decay", "lmbda", "beta_final"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        if self.beta_final <= 0:
            raise ValueError(f"beta_final must be > 0, got {self.beta_final}")
        if self.mask_lr is not None and (not np.isfinite(self.mask_lr) or self.mask_lr < 0):
            raise ValueError(f"mask_lr must be finite and >= 0 or None, got {self.mask_lr}")
        if self.reset not in pcs.RESET_RULES:
            raise ValueError(f"reset must be one of {pcs.RESET_RULES}, got {self.reset!r}")
        if self.ticket_mask not in TICKET_MASKS:
            raise ValueError(f"ticket_mask must be one of {TICKET_MASKS}, got {self.ticket_mask!r}")
        if self.prune_scope not in pimp.SCOPES:
            raise ValueError(f"prune_scope must be one of {pimp.SCOPES}, got {self.prune_scope!r}")
        if not 0 <= self.prune_rate < 1:
            raise ValueError(f"prune_rate must be in [0, 1), got {self.prune_rate}")

    @property
    def decay_epochs(self) -> tuple[int, ...]:
        """The epochs of a round at which the lr decays (``milestones``, or the official ones scaled)."""
        if self.milestones is not None:
            return self.milestones
        return tuple(sorted({m for m in (round(self.epochs * 56 / 85), round(self.epochs * 71 / 85))
                             if 0 < m < self.epochs}))


class Task(NamedTuple):
    """A model and its data: what every driver trains."""

    model: Any
    train: Any
    test: Any
    train_transform: Any
    eval_transform: Any
    example: jax.Array
    mesh: Any


def make_task(model, dataset, mesh=None, eval_split: str = "test") -> Task:
    """Bundle a model with a loaded :class:`pae.data.Dataset` (default mesh: all devices)."""
    mesh = distributed.data_mesh() if mesh is None else mesh
    return Task(model, dataset["train"], dataset[eval_split], dataset.transform(True),
                dataset.transform(False), jnp.asarray(dataset.example_inputs()), mesh)


# ----------------------------------------------------------------------------- optimizers

def round_schedule(lr: float, steps_per_epoch: int, epochs: int, milestones=(), decay=0.1):
    """Step-decay lr indexed by the step *within the round* (``count mod epochs*steps_per_epoch``)."""
    bounds = {int(m) * steps_per_epoch: decay for m in milestones if 0 < m < epochs}
    base = optax.piecewise_constant_schedule(lr, bounds)
    period = steps_per_epoch * epochs
    return lambda count: base(jnp.mod(count, period))


def _weights_tx(cfg: SearchConfig, spe: int):
    sched = round_schedule(cfg.lr, spe, cfg.epochs, cfg.decay_epochs, cfg.lr_decay)
    sgd = optax.sgd(sched, momentum=cfg.momentum or None, nesterov=cfg.momentum > 0)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), sgd) if cfg.weight_decay else sgd


def cs_optimizer(cfg: SearchConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Weights: coupled L2 then Nesterov SGD; mask logits: the same SGD without decay (own lr)."""
    mask_lr = cfg.lr if cfg.mask_lr is None else cfg.mask_lr
    sched = round_schedule(mask_lr, steps_per_epoch, cfg.epochs, cfg.decay_epochs, cfg.lr_decay)
    mask_tx = optax.sgd(sched, momentum=cfg.momentum or None, nesterov=cfg.momentum > 0)
    return role_optimizer({"weights": _weights_tx(cfg, steps_per_epoch), "mask": mask_tx})


def ticket_optimizer(cfg: SearchConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Weights as in :func:`cs_optimizer`; fixed masks are frozen."""
    return role_optimizer({"weights": _weights_tx(cfg, steps_per_epoch)})


# ----------------------------------------------------------------------------- loops

def _spe(task: Task, cfg: SearchConfig) -> int:
    return pdata.num_batches(len(task.train), cfg.batch_size)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _epoch(step, state, task, cfg, epoch, ctx):
    sums = None
    for batch in pdata.iterate_batches(task.train, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                       augment=task.train_transform):
        state, m = step(state, distributed.shard_batch(batch, task.mesh), ctx)
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
    return state, sums


def _evaluate(eval_step, state, task, cfg, ctx):
    total = None
    for batch in pdata.iterate_batches(task.test, cfg.batch_size, shuffle=False,
                                       augment=task.eval_transform):
        sums = eval_step(state, distributed.shard_batch(batch, task.mesh), ctx)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return _acc(total)


def _acc(sums):
    return np.asarray(sums["correct"]) / np.maximum(np.asarray(sums["count"]), 1.0)


def _state(params, batch_stats, tx, seed) -> TrainState:
    # host copies: the jitted steps donate their state, and the caller keeps its arrays
    params, batch_stats = _host(params), _host(batch_stats)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), key=jax.random.PRNGKey(seed))


def _stack(tree, n):
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + jnp.shape(x)), tree)


def _checkpointer(directory, driver: str, task: Task, cfg: SearchConfig, **extra) -> Checkpointer | None:
    """orbax checkpoints of a driver's progress; the identity ties them to this driver, model and config."""
    if directory is None:
        return None
    identity = {"driver": driver, "model": type(task.model).__name__,
                "config": dataclasses.asdict(cfg), **extra}
    return Checkpointer(directory, json.loads(json.dumps(identity, default=str)), max_to_keep=2)


def _resume(ckpt: Checkpointer | None, state: TrainState) -> tuple[int, Any, list]:
    """``(step, {"state", "rewind"}, history)`` of the latest save, or ``(0, None, [])`` if none."""
    start = (ckpt.latest_step() or 0) if ckpt else 0
    if not start:
        return 0, None, []
    saved, history = ckpt.restore(start, {"state": state, "rewind": (state.params, state.batch_stats)})
    return start, saved, history


def _runs_of(name: str, value: Any) -> bool:
    """True for a non-empty 1-D sequence of finite numbers (one run each), False for one number."""
    if isinstance(value, (str, bytes)) or np.ndim(value) > 1 or (np.ndim(value) == 1 and not len(value)):
        raise ValueError(f"{name} must be a float or a non-empty 1-D sequence of floats, got {value!r}")
    pcs.check_finite(name, value)
    return np.ndim(value) == 1


class SearchResult(NamedTuple):
    """``latent``: final search latent (SoftMask nodes); ``rewind_params``/``rewind_batch_stats``: the
    rewind point; ``history``: one row per round; ``densities``: hard density per run; ``epochs``:
    search epochs spent (per run); ``seconds``: wall time of the search; ``s_init``: the search's
    ``s_init`` (a list for a parallel search)."""

    latent: Any
    rewind_params: Any
    rewind_batch_stats: Any
    history: list
    densities: np.ndarray
    epochs: int
    seconds: float
    s_init: float | list


def cs_search(task: Task, cfg: SearchConfig, s_init: float | Sequence[float],
              select: pselect.Selector | None = None, log: Callable[[str], None] | None = None,
              checkpoint_dir: str | os.PathLike | None = None) -> SearchResult:
    """Continuous-Sparsification ticket search.

    ``s_init`` a float: one run. A sequence: *parallel* ticket search, one run per value (one
    sparsity level each) in one compiled program, ``jax.vmap``-ed over the runs (same data order and
    initial weights as the corresponding single runs). Results then have a leading run axis.

    ``checkpoint_dir``: save the search (state, rewind point, history) there after every epoch with
    orbax, atomically, and resume from the latest save when called again; the resumed search equals
    an uninterrupted one. A directory written by another driver, model, config or ``s_init`` raises
    :class:`pae.train.CheckpointError`.
    """
    batched = _runs_of("s_init", s_init)
    s_inits = [float(v) for v in np.ravel(s_init)]
    began = time.perf_counter()
    spe = _spe(task, cfg)
    tx = cs_optimizer(cfg, spe)
    # the paper's reset multiplies by the beta the round ended at (beta_final unless E == 1)
    beta_reached = pcs.temperature_schedule(cfg.epochs - 1, cfg.epochs, cfg.beta_final)
    make_t = lambda s0: pcs.continuous_sparsification(select, s0, cfg.lmbda, cfg.scaled)  # noqa
    state = create_train_state(task.model, tx, task.example, cfg.seed, make_t(s_inits[0]).init)
    if batched:
        n = len(s_inits)
        s_arr = jnp.asarray(s_inits, jnp.float32)
        state = _stack(state, n)
        state = state.replace(params=jax.vmap(lambda lat, s0: pcs.map_nodes(
            lambda m: m.replace(logits=jnp.full_like(m.logits, s0)), lat, pcs.SoftMask))(
                state.params, s_arr))

        def pstep(states, batch, ctx):
            def one(st, s0):
                t = make_t(s0)
                return make_train_step(task.model, tx, reparam=t.apply, penalty=t.penalty,
                                       donate=False)(st, batch, ctx)
            return jax.vmap(one)(states, s_arr)

        def peval(states, batch, ctx):
            return jax.vmap(lambda st, s0: make_eval_step(task.model, reparam=make_t(s0).apply)(
                st, batch, ctx))(states, s_arr)

        step, eval_step = jax.jit(pstep, donate_argnums=0), jax.jit(peval)
        reset = jax.jit(jax.vmap(lambda lat, s0: pcs.reset_logits(lat, s0, cfg.reset, beta_reached)))
        dens = jax.jit(jax.vmap(density))
        reset_fn = lambda lat: reset(lat, s_arr)  # noqa: E731
    else:
        t = make_t(s_inits[0])
        step = make_train_step(task.model, tx, reparam=t.apply, penalty=t.penalty)
        eval_step = make_eval_step(task.model, reparam=t.apply)
        reset_fn = lambda lat: pcs.reset_logits(lat, s_inits[0], cfg.reset, beta_reached)  # noqa
        dens = density
    state = distributed.replicate(state, task.mesh)
    rewind = None
    ckpt = _checkpointer(checkpoint_dir, "cs_search", task, cfg, s_init=s_inits if batched else s_inits[0],
                         select=repr(select))
    start, saved, history = _resume(ckpt, state)
    if start:
        state = saved["state"]
        rewind = _host(saved["rewind"]) if start > cfg.rewind_epoch else None
        if log:
            log(f"cs search resumed from {ckpt.directory} after epoch {start}")
    for done in range(start, cfg.rounds * cfg.epochs):
        r, e = divmod(done, cfg.epochs)
        if r == 0 and e == cfg.rewind_epoch:
            rewind = _host((state.params, state.batch_stats))
        ctx = Context.make(beta=pcs.temperature_schedule(e, cfg.epochs, cfg.beta_final))
        state, sums = _epoch(step, state, task, cfg, done, ctx)
        if e == cfg.epochs - 1:
            d = np.asarray(dens(state.params))
            soft_acc = _evaluate(eval_step, state, task, cfg, ctx)
            history.append({"round": r, "density": d.tolist(), "train_acc": _acc(sums).tolist(),
                            "soft_test_acc": soft_acc.tolist(), "beta": float(ctx.beta)})
            if log:
                log(f"cs round {r}: density {np.round(d, 4).tolist()} soft test acc "
                    f"{np.round(soft_acc, 4).tolist()}")
            if r < cfg.rounds - 1:
                state = state.replace(params=reset_fn(state.params))
        if ckpt:  # before the rewind point is taken, its slot holds the current weights
            ckpt.save(done + 1, {"state": state, "rewind": rewind or (state.params, state.batch_stats)},
                      history)
    if ckpt:
        ckpt.close()
    final = _host(state.params)
    return SearchResult(final, rewind[0], rewind[1], history, np.asarray(dens(state.params)),
                        cfg.rounds * cfg.epochs, time.perf_counter() - began,
                        s_inits if batched else s_inits[0])


def train_masked(task: Task, cfg: SearchConfig, latent: Any, batch_stats: Any, *, seed_offset: int = 0,
                 batched: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Train a FixedMask latent for ``cfg.epochs`` with a fresh weight optimizer; masks frozen.

    ``batched``: the latent has a leading run axis (one vmapped program). ``seed_offset`` shifts the
    state's PRNG key (dropout etc.), not the data order (``cfg.seed``). Returns ``{"test_acc",
    "train_acc", "density", "epochs"}`` (lists over runs when ``batched``).
    """
    spe = _spe(task, cfg)
    tx = ticket_optimizer(cfg, spe)
    t = fixed_masks()
    step = make_train_step(task.model, tx, reparam=t.apply, donate=not batched)
    eval_step = make_eval_step(task.model, reparam=t.apply)
    if batched:
        step = jax.jit(jax.vmap(step, in_axes=(0, None, None)), donate_argnums=0)
        eval_step = jax.jit(jax.vmap(eval_step, in_axes=(0, None, None)))
        state = jax.vmap(lambda p, b: TrainState(
            step=jnp.zeros((), jnp.int32), params=p, batch_stats=b, opt_state=tx.init(p),
            key=jax.random.PRNGKey(cfg.seed + seed_offset)))(_host(latent), _host(batch_stats))
    else:
        state = _state(latent, batch_stats, tx, cfg.seed + seed_offset)
    state = distributed.replicate(state, task.mesh)
    ctx = Context.make()
    for e in range(cfg.epochs):
        state, sums = _epoch(step, state, task, cfg, e, ctx)
    acc = _evaluate(eval_step, state, task, cfg, ctx)
    d = np.asarray(jax.vmap(density)(state.params) if batched else density(state.params))
    out = {"test_acc": acc.tolist(), "train_acc": _acc(sums).tolist(), "density": d.tolist(),
           "epochs": cfg.epochs}
    if log:
        log(f"ticket: density {np.round(d, 4).tolist()} test acc {np.round(acc, 4).tolist()}")
    return out


def cs_ticket(result: SearchResult, cfg: SearchConfig) -> Any:
    """Ticket latent(s): hard masks of the search's logits on the rewound weights.

    ``cfg.ticket_mask="finalize"`` (default, official) uses ``1[s>0]/sigmoid(s_init)`` (or ``1[s>0]``
    when ``cfg.scaled`` is False). ``"binary"`` always uses ``1[s>0]``: with scaled soft masks
    (``m ~ 1`` at the rewind point) the ticket then computes what the search network computed at the
    rewind point on the kept weights. Without BN to absorb it, the official ``1/sigmoid(s_init)``
    (about 2 per layer) multiplies a deep MLP's logits by ~2**depth and can wreck ticket training.
    """
    scaled = cfg.scaled and cfg.ticket_mask == "finalize"
    s_init = result.s_init
    if _runs_of("s_init", s_init):
        return jax.vmap(lambda lat, old, s0: pcs.to_ticket(lat, old, s0, scaled))(
            result.latent, result.rewind_params, jnp.asarray(s_init, jnp.float32))
    return pcs.to_ticket(result.latent, result.rewind_params, s_init, scaled)


def random_reinit(task: Task, ticket: Any, seed: int) -> tuple[Any, Any]:
    """The ticket's masks on freshly initialized weights (and fresh BN statistics): the control."""
    variables = init_variables(task.model, task.example, jax.random.PRNGKey(seed))
    masked = set(mask_tree(ticket))
    fresh = pimp.with_unit_masks(variables["params"], pselect.Selector(
        lambda p, x: p in masked, "ticket masks"))

    def take_mask(path, new, old):
        if not isinstance(new, pcs.FixedMask):
            return new
        _check_shape(path, new.weight, old.mask)
        return new.replace(mask=old.mask)

    out = _zip_masked(take_mask, fresh, ticket, "ticket does not match the model's parameter tree")
    return out, variables.get("batch_stats", {})


def imp_search(task: Task, cfg: SearchConfig, levels: int, select: pselect.Selector | None = None,
               log: Callable[[str], None] | None = None,
               checkpoint_dir: str | os.PathLike | None = None) -> list[dict]:
    """Iterative magnitude pruning with rewinding: round 0 trains dense from the same initial weights
    as :func:`cs_search` and :func:`train_dense` (saving the rewind point at ``rewind_epoch``); each
    later round prunes ``prune_rate`` of the remaining weights, rewinds weights/BN params/batch stats
    and trains E epochs with a fresh optimizer.

    Returns one row per level k = 0..levels: ``density``, ``test_acc`` (the ticket at that level,
    trained from the rewind point for k >= 1) and ``epochs`` (total epochs spent to have it trained).
    ``checkpoint_dir``: save after every level (orbax, atomic) and resume from the latest level.
    """
    if int(levels) < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    spe = _spe(task, cfg)
    tx = ticket_optimizer(cfg, spe)
    t = fixed_masks()
    step = make_train_step(task.model, tx, reparam=t.apply)
    eval_step = make_eval_step(task.model, reparam=t.apply)
    # the same initial weights as cs_search and train_dense for this seed
    state = distributed.replicate(create_train_state(
        task.model, tx, task.example, cfg.seed, lambda p, _: pimp.with_unit_masks(p, select)), task.mesh)
    ctx = Context.make()
    rewind = None
    ckpt = _checkpointer(checkpoint_dir, "imp_search", task, cfg, select=repr(select))
    start, saved, rows = _resume(ckpt, state)
    if start:
        if start > levels:  # this many levels (or more) are already done
            ckpt.close()
            return rows[:levels + 1]
        state, rewind = saved["state"], _host(saved["rewind"])
        if log:
            log(f"imp resumed from {ckpt.directory} at level {start}")
    for k in range(start, levels + 1):
        for e in range(cfg.epochs):
            if k == 0 and e == cfg.rewind_epoch:
                rewind = _host((state.params, state.batch_stats))
            state, _ = _epoch(step, state, task, cfg, e, ctx)
        acc = float(_evaluate(eval_step, state, task, cfg, ctx))
        d = float(density(state.params))
        rows.append({"level": k, "density": d, "test_acc": acc, "epochs": (k + 1) * cfg.epochs})
        if log:
            log(f"imp level {k}: density {d:.4f} test acc {acc:.4f}")
        if k == levels and not ckpt:
            break
        # the next level's starting point: pruned, rewound, fresh optimizer (saved even after the
        # last level, so a later call with more levels continues from it)
        pruned = pimp.magnitude_prune(_host(state.params), cfg.prune_rate, cfg.prune_scope)
        params = pcs.rewind(pruned, rewind[0])
        state = distributed.replicate(_state(params, rewind[1], tx, cfg.seed), task.mesh)
        if ckpt:
            ckpt.save(k + 1, {"state": state, "rewind": rewind}, rows)
    if ckpt:
        ckpt.close()
    return rows


def train_dense(task: Task, cfg: SearchConfig, log: Callable[[str], None] | None = None) -> dict:
    """The dense baseline: the unmasked model trained for E epochs from initialization."""
    spe = _spe(task, cfg)
    tx = _weights_tx(cfg, spe)
    state = distributed.replicate(create_train_state(task.model, tx, task.example, cfg.seed), task.mesh)
    step, eval_step = make_train_step(task.model, tx), make_eval_step(task.model)
    for e in range(cfg.epochs):
        state, sums = _epoch(step, state, task, cfg, e, {})
    acc = float(_evaluate(eval_step, state, task, cfg, {}))
    if log:
        log(f"dense: test acc {acc:.4f}")
    return {"density": 1.0, "test_acc": acc, "train_acc": float(_acc(sums)), "epochs": cfg.epochs}


__all__ = ["PAPER_CIFAR", "TICKET_MASKS", "SearchConfig", "SearchResult", "Task", "cs_optimizer", "cs_search",
           "cs_ticket", "imp_search", "make_task", "masked_count", "random_reinit", "round_schedule",
           "ticket_optimizer", "train_dense", "train_masked"]
