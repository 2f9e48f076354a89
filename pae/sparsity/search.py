"""Ticket search as lists of phases on the one engine (:func:`pae.train.train_phases`).

Protocol (official CS code, ``main.py``): R rounds of E epochs; beta restarts at 1 every round and
follows :func:`~pae.sparsity.cs.temperature_schedule`; the lr schedule is indexed by the epoch *within*
the round and applies to both optimizers; momentum persists across rounds; weights are not rewound
between rounds; between rounds the logits are reset (:func:`~pae.sparsity.cs.reset_logits`). The
rewind point is the state (weights, BN params, BN batch statistics) at the start of epoch
``rewind_epoch`` of round 0. The ticket is the hard mask applied to the rewound weights, trained with a
fresh weight optimizer; the mask is frozen.

The phase builders (:func:`cs_phases`, :func:`ticket_phase`, :func:`imp_phases`, :func:`dense_phases`)
are the method; the drivers (:func:`cs_search`, :func:`train_ticket`, :func:`imp_search`,
:func:`train_dense`) run them on a :class:`pae.train.Task` and shape the rows for the experiment.

Which defaults apply where: the library follows the official code (``SearchConfig(scaled=True,
ticket_mask="finalize")``: soft mask ``sigmoid(beta*s)/sigmoid(s_init)``, the ticket keeps that
scale). ``experiments/tickets.py`` runs BN-free nets (LeNet, Conv-2) and defaults to the paper's
unscaled mask and a binary ticket (``--scaled``/``--paper`` restore the official ones): without BN to
absorb it, the official scale (about 2 per layer once beta is large) diverged 1 of 25 LeNet searches.
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pae.core import Context, role_optimizer, select as pselect
from pae.train.engine import Phase, Task, host, init_state, make_task, train_phases
from pae.train.state import TrainState, init_variables
from pae.sparsity import cs as pcs
from pae.sparsity import imp as pimp
from pae.sparsity.masks import _check_shape, _zip_masked, density, fixed_masks, mask_tree, masked_count

#: The official CIFAR-10 ResNet-20 protocol.
PAPER_CIFAR = dict(rounds=3, epochs=85, rewind_epoch=2, batch_size=128, lr=0.1, momentum=0.9,
                   weight_decay=1e-4, milestones=(56, 71), beta_final=200.0, lmbda=1e-8, reset="code")


TICKET_MASKS = ("finalize", "binary")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Ticket-search hyperparameters. Defaults: the CIFAR-10 protocol of the official CS code
    (:data:`PAPER_CIFAR`), except the between-round ``reset``, which defaults to the paper's rule
    (``reset="code"`` gives the official script's; :data:`PAPER_CIFAR` uses it).

    ``epochs`` is per search round; ``ticket_epochs`` (tickets, random re-inits) and ``imp_epochs``
    (every IMP level) default to it. The lr decays at ``milestones`` of each round (or of each ticket
    or IMP level, those below its length), or, when None, at the official 56/85 and 71/85 of each.
    """

    rounds: int = 3
    epochs: int = 85
    ticket_epochs: int | None = None
    imp_epochs: int | None = None
    rewind_epoch: int = 2               # rewind to the start of this epoch of round 0 (and IMP level 0)
    batch_size: int = 128
    lr: float = 0.1
    mask_lr: float | None = None        # None: same as lr
    momentum: float = 0.9
    weight_decay: float = 1e-4          # coupled L2 on weights only (never on mask logits)
    milestones: tuple[int, ...] | None = None
    lr_decay: float = 0.1
    beta_final: float = 200.0
    lmbda: float = 1e-8
    reset: str = "paper"                # between rounds: "paper" min(beta_T*s, s_init) | "code" min(s, s_init)
    scaled: bool = True                 # keep the official 1/sigmoid(s_init) mask scale
    ticket_mask: str = "finalize"       # "finalize": the transform's hard mask (scaled if scaled);
                                        # "binary": 1[s > 0] (for nets without BN)
    prune_rate: float = 0.2             # IMP
    prune_scope: str = "global"         # IMP: "global" | "layer"
    seed: int = 0

    def __post_init__(self):
        for name in ("rounds", "epochs", "batch_size", "rewind_epoch", "seed", "ticket_epochs", "imp_epochs"):
            v = getattr(self, name)
            if v is None and name in ("ticket_epochs", "imp_epochs"):
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {v!r}")
        for name in ("rounds", "epochs", "batch_size", "ticket_epochs", "imp_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "mask_lr", "momentum", "weight_decay", "lr_decay", "beta_final", "lmbda",
                     "prune_rate"):
            v = getattr(self, name)
            if not (v is None and name == "mask_lr") and (isinstance(v, bool)
                                                         or not isinstance(v, numbers.Real)):
                raise TypeError(f"{name} must be a number, got {v!r}")
        if self.milestones is not None:
            if np.ndim(self.milestones) != 1 or isinstance(self.milestones, str):
                raise TypeError(f"milestones must be a sequence of epochs or None, got {self.milestones!r}")
            object.__setattr__(self, "milestones", tuple(self.milestones))
            if not all(isinstance(m, numbers.Integral) and 0 < m < self.epochs for m in self.milestones):
                raise ValueError(f"milestones must be epochs in (0, epochs={self.epochs}), got "
                                 f"{self.milestones}")
        if not np.isfinite(self.lr_decay) or self.lr_decay <= 0:
            raise ValueError(f"lr_decay must be finite and > 0, got {self.lr_decay}")
        if not 0 <= self.rewind_epoch < self.epochs:
            raise ValueError(f"rewind_epoch must be in [0, epochs={self.epochs}), got {self.rewind_epoch}")
        if self.rewind_epoch >= self.imp_length:
            raise ValueError(f"rewind_epoch={self.rewind_epoch} must be below imp_epochs={self.imp_epochs}")
        for name in ("lr", "momentum", "weight_decay", "lmbda", "beta_final"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        if self.beta_final <= 0:
            raise ValueError(f"beta_final must be > 0, got {self.beta_final}")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1) (SGD diverges otherwise), got {self.momentum}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
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
    def ticket_length(self) -> int:
        return self.ticket_epochs or self.epochs

    @property
    def imp_length(self) -> int:
        return self.imp_epochs or self.epochs

    def decay_at(self, epochs: int) -> tuple[int, ...]:
        """The epochs of a stretch of ``epochs`` at which the lr decays."""
        if self.milestones is not None:
            return tuple(m for m in self.milestones if m < epochs)
        return tuple(sorted({m for m in (round(epochs * 56 / 85), round(epochs * 71 / 85))
                             if 0 < m < epochs}))

    @property
    def decay_epochs(self) -> tuple[int, ...]:
        """The epochs of a search round at which the lr decays."""
        return self.decay_at(self.epochs)


# ----------------------------------------------------------------------------- optimizers

def round_schedule(lr: float, steps_per_epoch: int, epochs: int, milestones=(), decay=0.1):
    """Step-decay lr indexed by the step *within the round* (``count mod epochs*steps_per_epoch``)."""
    bounds = {int(m) * steps_per_epoch: decay for m in milestones if 0 < m < epochs}
    base = optax.piecewise_constant_schedule(lr, bounds)
    period = steps_per_epoch * epochs
    return lambda count: base(jnp.mod(count, period))


def _sgd(cfg: SearchConfig, lr: float, spe: int, epochs: int):
    sched = round_schedule(lr, spe, epochs, cfg.decay_at(epochs), cfg.lr_decay)
    return optax.sgd(sched, momentum=cfg.momentum or None, nesterov=cfg.momentum > 0)


def _weights_tx(cfg: SearchConfig, spe: int, epochs: int):
    sgd = _sgd(cfg, cfg.lr, spe, epochs)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), sgd) if cfg.weight_decay else sgd


def cs_optimizer(cfg: SearchConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Weights: coupled L2 then Nesterov SGD; mask logits: the same SGD without decay (own lr)."""
    mask_lr = cfg.lr if cfg.mask_lr is None else cfg.mask_lr
    return role_optimizer({"weights": _weights_tx(cfg, steps_per_epoch, cfg.epochs),
                           "mask": _sgd(cfg, mask_lr, steps_per_epoch, cfg.epochs)})


def ticket_optimizer(cfg: SearchConfig, steps_per_epoch: int, epochs: int | None = None
                     ) -> optax.GradientTransformation:
    """Weights as in :func:`cs_optimizer` over ``epochs`` (default the ticket's); masks are frozen."""
    return role_optimizer({"weights": _weights_tx(cfg, steps_per_epoch, epochs or cfg.ticket_length)})


# ----------------------------------------------------------------------------- phase builders

def _density(state, ctx):
    return {"density": density(state.params)}


def _fresh(params, batch_stats, seed: int) -> TrainState:
    """A ticket's or IMP level's starting state: step 0, the seed's key, a fresh optimizer."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=None, key=jax.random.PRNGKey(seed))


def cs_phases(cfg: SearchConfig, select: pselect.Selector | None = None, *,
              ticket: bool = True) -> list[Phase]:
    """The CS search: ``round0 .. round{R-1}`` (then ``ticket`` unless ``ticket=False``).

    Keeps ``"rewind"`` (after ``rewind_epoch`` epochs of round 0) and ``"searched"`` (the end of the
    last round). The latent's :class:`~pae.sparsity.SoftMask` nodes carry ``s_init``; start from
    ``init_state(model, example, seed, continuous_sparsification(select, s_init, ...).init)``.
    """
    t = pcs.continuous_sparsification(select, 0.0, cfg.lmbda, cfg.scaled)
    # the paper's reset multiplies by the beta the round ended at (beta_final unless E == 1)
    beta_reached = pcs.temperature_schedule(cfg.epochs - 1, cfg.epochs, cfg.beta_final)

    def optimizer(spe):
        return cs_optimizer(cfg, spe)

    def context(epoch):
        return Context.make(beta=pcs.temperature_schedule(epoch, cfg.epochs, cfg.beta_final))

    def reset(state, snapshots):
        return state.replace(params=pcs.reset_logits(state.params, cfg.reset, beta_reached))

    phases = []
    for r in range(cfg.rounds):
        keep = {cfg.rewind_epoch: "rewind"} if r == 0 else {}
        if r == cfg.rounds - 1:
            keep[cfg.epochs] = "searched"
        phases.append(Phase(f"round{r}", cfg.epochs, optimizer, t, context, reset if r else None, keep,
                            optimizer_state="keep", eval_every=0, data_epochs_from=r * cfg.epochs,
                            metrics=_density))
    return phases + ([ticket_phase(cfg)] if ticket else [])


def ticket_phase(cfg: SearchConfig, name: str = "ticket", *, from_snapshots: bool = True) -> Phase:
    """Train a ticket for ``cfg.ticket_length`` epochs with a fresh weight optimizer, masks frozen.

    ``from_snapshots``: enter by turning the ``"searched"`` latent's logits into hard masks
    (``cfg.ticket_mask``) on the ``"rewind"`` weights and batch statistics (see :func:`cs_ticket`);
    otherwise the state must already hold :class:`~pae.sparsity.FixedMask` nodes (a re-init control).
    """
    def enter(state, snapshots):
        rewound = snapshots["rewind"]
        return _fresh(cs_ticket(snapshots["searched"].params, rewound.params, cfg),
                      rewound.batch_stats, cfg.seed)

    def optimizer(spe):
        return ticket_optimizer(cfg, spe)

    return Phase(name, cfg.ticket_length, optimizer, fixed_masks(), None,
                 enter if from_snapshots else None, eval_every=0, data_epochs_from=0, metrics=_density)


def cs_ticket(searched: Any, rewound: Any, cfg: SearchConfig) -> Any:
    """Ticket latent: the hard masks of ``searched``'s logits on ``rewound``'s weights.

    ``cfg.ticket_mask="finalize"`` (default, official) uses ``1[s>0]/sigmoid(s_init)`` (or ``1[s>0]``
    when the search was unscaled). ``"binary"`` always uses ``1[s>0]``: with scaled soft masks
    (``m ~ 1`` at the rewind point) the ticket then computes what the search network computed at the
    rewind point on the kept weights. Without BN to absorb it, the official ``1/sigmoid(s_init)``
    (about 2 per layer) multiplies a deep MLP's logits by ~2**depth and can wreck ticket training.
    """
    return pcs.to_ticket(searched, rewound, binary=cfg.ticket_mask == "binary")


def imp_phases(cfg: SearchConfig, levels: int) -> list[Phase]:
    """IMP with rewinding: ``imp0`` trains the masked-dense net (keeping ``"rewind"``); each
    ``imp{k}`` prunes ``prune_rate`` of the remaining weights by magnitude, rewinds weights, BN
    parameters and statistics, and trains ``imp_length`` epochs with a fresh optimizer."""
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 0:
        raise ValueError(f"levels must be an int >= 0, got {levels!r}")

    def optimizer(spe):
        return ticket_optimizer(cfg, spe, cfg.imp_length)

    def prune(state, snapshots):
        pruned = pimp.magnitude_prune(host(state.params), cfg.prune_rate, cfg.prune_scope)
        rewound = snapshots["rewind"]
        return _fresh(pcs.rewind(pruned, rewound.params), rewound.batch_stats, cfg.seed)

    t = fixed_masks()
    return [Phase(f"imp{k}", cfg.imp_length, optimizer, t, None, prune if k else None,
                  {cfg.rewind_epoch: "rewind"} if k == 0 else {}, eval_every=0, data_epochs_from=0,
                  metrics=_density)
            for k in range(levels + 1)]


def dense_phases(cfg: SearchConfig) -> list[Phase]:
    """The dense baseline: the unmasked model trained for ``epochs`` from initialization."""
    return [Phase("dense", cfg.epochs, lambda spe: _weights_tx(cfg, spe, cfg.epochs), eval_every=0,
                  data_epochs_from=0)]


# ----------------------------------------------------------------------------- drivers

def _runs_of(name: str, value: Any) -> bool:
    """True for a non-empty 1-D sequence of finite numbers (one run each), False for one number."""
    if isinstance(value, (str, bytes)) or np.ndim(value) > 1 or (np.ndim(value) == 1 and not len(value)):
        raise ValueError(f"{name} must be a float or a non-empty 1-D sequence of floats, got {value!r}")
    pcs.check_finite(name, value)
    return np.ndim(value) == 1


def _as_task(task) -> Task:
    if not isinstance(task, Task):
        raise TypeError(f"task must be a pae.train.Task (pae.train.make_task(model, dataset)), got "
                        f"{type(task).__name__}")
    return task


def _engine(task, cfg, phases, state, name, *, identity=None, **kwargs):
    ident = {"driver": name, "config": dataclasses.asdict(cfg), **(identity or {})}
    return train_phases(task, phases, state, batch_size=cfg.batch_size, seed=cfg.seed,
                        keep_checkpoints=2, identity=ident, **kwargs)


class SearchResult(NamedTuple):
    """``history``: one row per round (``round``, ``density``, ``train_acc``, ``soft_test_acc``,
    ``beta``); ``searched``: the final search latent (SoftMask nodes); ``rewind``: the state at the
    rewind point; ``ticket``: the trained ticket's state (FixedMask latent; None if not trained);
    ``ticket_row``: its ``density``, ``test_acc``, ``train_acc``, ``epochs``; ``densities``: the
    search's hard density; ``epochs``: search epochs; ``seconds``: wall time; ``s_init``: a float, or
    a list for a parallel search (then every array has a leading run axis)."""

    history: list
    searched: Any
    rewind: TrainState
    ticket: TrainState | None
    ticket_row: dict | None
    densities: np.ndarray
    epochs: int
    seconds: float
    s_init: float | list


def _ticket_row(row: dict, epochs: int) -> dict:
    return {"test_acc": row["test_acc"], "train_acc": row["train_acc"], "density": row["density"],
            "epochs": epochs}


def cs_search(task: Task, cfg: SearchConfig, s_init: float | Sequence[float],
              select: pselect.Selector | None = None, *, ticket: bool = True,
              checkpoint_dir=None, log: Callable[[str], None] | None = None,
              callbacks: Sequence[Callable] = ()) -> SearchResult:
    """Continuous-Sparsification ticket search, then (``ticket``) the ticket's training.

    ``s_init`` a float: one run. A sequence: a *parallel* search, one run per value in one compiled
    program (``jax.vmap`` over a leading run axis; same data order and initial weights as the single
    runs). ``checkpoint_dir``: the engine's checkpoints (every epoch); a second call resumes where the
    first stopped and ends equal to an uninterrupted run. Another driver, model, training set, config
    or ``s_init`` in that directory raises :class:`pae.train.CheckpointError`.
    """
    batched = _runs_of("s_init", s_init)
    task = _as_task(task)
    s_inits = [float(v) for v in np.ravel(s_init)]
    began = time.perf_counter()
    t = pcs.continuous_sparsification(select, s_inits[0], cfg.lmbda, cfg.scaled)
    state = init_state(task.model, task.example, cfg.seed, t.init)
    runs = jnp.asarray(s_inits, jnp.float32) if batched else None
    phases = cs_phases(cfg, select, ticket=ticket)
    out = _engine(task, cfg, phases, state, "cs_search", runs=runs,
                  setup=lambda st, s0: st.replace(params=pcs.with_s_init(st.params, s0)),
                  identity={"s_init": s_inits if batched else s_inits[0], "select": repr(select)},
                  checkpoint_dir=checkpoint_dir, log=log, callbacks=callbacks)
    beta = pcs.temperature_schedule(cfg.epochs - 1, cfg.epochs, cfg.beta_final)
    history = [{"round": r, "density": row["density"], "train_acc": row["train_acc"],
                "soft_test_acc": row["test_acc"], "beta": beta}
               for r, row in enumerate(out.last(p.name) for p in phases[:cfg.rounds])]
    searched = out.snapshots["searched"].params
    return SearchResult(history, searched, out.snapshots["rewind"],
                        host(out.state) if ticket else None,
                        _ticket_row(out.last("ticket"), cfg.ticket_length) if ticket else None,
                        np.asarray(density(searched) if not batched else jax.vmap(density)(searched)),
                        cfg.rounds * cfg.epochs, time.perf_counter() - began,
                        s_inits if batched else s_inits[0])


def train_ticket(task: Task, cfg: SearchConfig, latent: Any, batch_stats: Any, *, batched: bool = False,
                 log: Callable[[str], None] | None = None) -> tuple[TrainState, dict]:
    """Train a FixedMask latent (e.g. a ticket's masks on other weights) as a ticket is trained.

    ``batched``: the latent has a leading run axis (one vmapped program). Returns the trained state
    and ``{"test_acc", "train_acc", "density", "epochs"}`` (lists over runs when ``batched``).
    """
    task = _as_task(task)
    phase = ticket_phase(cfg, from_snapshots=False)
    latent, batch_stats = host(latent), host(batch_stats)
    if batched:
        first = jax.tree.map(lambda x: x[0], (latent, batch_stats))
        out = _engine(task, cfg, [phase], _fresh(*first, cfg.seed), "train_ticket",
                      runs=(latent, batch_stats),
                      setup=lambda st, run: st.replace(params=run[0], batch_stats=run[1]), log=log)
    else:
        out = _engine(task, cfg, [phase], _fresh(latent, batch_stats, cfg.seed), "train_ticket", log=log)
    return out.state, _ticket_row(out.last(phase.name), cfg.ticket_length)


def random_reinit(task: Task, ticket: Any, seed: int) -> tuple[Any, Any]:
    """The ticket's masks on freshly initialized weights (and fresh BN statistics): the control."""
    task = _as_task(task)
    variables = init_variables(task.model, jnp.asarray(task.example), jax.random.PRNGKey(seed))
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
               log: Callable[[str], None] | None = None, checkpoint_dir=None,
               callbacks: Sequence[Callable] = ()) -> list[dict]:
    """Iterative magnitude pruning with rewinding (:func:`imp_phases`) from the same initial weights as
    :func:`cs_search` and :func:`train_dense`.

    Returns one row per level k = 0..levels: ``level``, ``density``, ``test_acc`` (the ticket at that
    level, trained from the rewind point for k >= 1) and ``epochs`` (total epochs spent to have it).
    ``checkpoint_dir``: resumable; a later call with more ``levels`` continues from the saved run.
    """
    task = _as_task(task)
    phases = imp_phases(cfg, levels)
    state = init_state(task.model, task.example, cfg.seed, lambda p, _: pimp.with_unit_masks(p, select))
    out = _engine(task, cfg, phases, state, "imp_search", identity={"select": repr(select)},
                  checkpoint_dir=checkpoint_dir, log=log, callbacks=callbacks)
    return [{"level": k, "density": out.last(p.name)["density"], "test_acc": out.last(p.name)["test_acc"],
             "epochs": (k + 1) * cfg.imp_length} for k, p in enumerate(phases)]


def train_dense(task: Task, cfg: SearchConfig, log: Callable[[str], None] | None = None) -> dict:
    """The dense baseline: the unmasked model trained for ``epochs`` from initialization."""
    task = _as_task(task)
    out = _engine(task, cfg, dense_phases(cfg), init_state(task.model, task.example, cfg.seed),
                  "train_dense", log=log)
    row = out.last("dense")
    return {"density": 1.0, "test_acc": row["test_acc"], "train_acc": row["train_acc"],
            "epochs": cfg.epochs}


__all__ = ["PAPER_CIFAR", "TICKET_MASKS", "SearchConfig", "SearchResult", "cs_optimizer", "cs_phases",
           "cs_search", "cs_ticket", "dense_phases", "imp_phases", "imp_search", "make_task",
           "masked_count", "random_reinit", "round_schedule", "ticket_optimizer", "ticket_phase",
           "train_dense", "train_ticket"]
