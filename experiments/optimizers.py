"""Issue 4 experiments: Adam vs AvaGrad over a learning-rate x epsilon grid; AdaBound vs CSGD vs SGD.

    python experiments/optimizers.py                       # both, embedded digits, a few minutes
    python experiments/optimizers.py --experiment grid     # only the lr x eps heatmaps
    python experiments/optimizers.py --paper-cifar 10      # WRN-28-10 on CIFAR-10, the paper's
                                                           # 200-epoch schedule (GPU, days)

``grid`` (Savarese et al., arXiv 1912.01823, the lr x eps heatmaps): trains one model per
(learning rate, epsilon) cell with Adam and with AvaGrad and plots the final validation accuracy.
The paper's claim: AvaGrad's good region is roughly axis-aligned (the best lr does not depend on
eps), Adam's lies on a diagonal (for eps >> sqrt(v) Adam is SGD with lr/eps). The script measures
this as the slope of log10(best lr) against log10(eps) over the columns where training worked.

``bound`` (Savarese, arXiv 1908.04457): AdaBound (lr 1e-3, final_lr 0.1, gamma 1e-3, and gamma
scaled so that gamma x steps equals the report's CIFAR runs) vs CSGD (lr 0.1, momentum 0.9,
dampened and bias-corrected) vs SGD with undampened momentum 0.9 (lr 0.1), over several seeds.
The report's claim: CSGD matches AdaBound.

Both use L2 weight decay 5e-4 (the papers' setting), the same initialization for every cell of a
grid, and the lr schedule of ``--schedule`` (a multiplier on every optimizer's step).

Engines. ``shared`` (default for embedded data): the cells of a grid (or the seeds) are parallel runs
of one phase on ``pae.train.train_phases``, one vmapped program on the same batch order: lr and eps
are optimizer *state* (``optax.inject_hyperparams``), the per-run values. ``run``: one
``pae.train.run`` per cell (records, checkpoints, resumable); used for CIFAR.

Writes ``<out>grid.json/.png`` and ``<out>bound.json/.png`` (default out prefix
``runs/optimizers/optim_``; the recorded results used ``--out experiments/results/optim_``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pae.optim as po
from pae import data as pdata
from pae import models as pmodels
from pae.train import (Phase, TrainConfig, create_train_state, host, make_schedule, make_task, run,
                       train_phases)

# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every run of an experiment shares."""

    dataset: str = "digits"
    model: str = "small_cnn"
    epochs: int = 20
    batch_size: int = 64
    val_size: int = 300
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    lr_decay: float = 0.1
    data_dir: str | None = None
    engine: str = "shared"
    workdir: str = "runs/optimizers"


def paper_cifar_setup(classes: int, data_dir: str | None) -> Setup:
    """The AvaGrad script's CIFAR setting: WRN-28-10, 200 epochs, batch 128, lr x0.2 at 60/120/160,
    L2 5e-4 (lolemacs/avagrad main.py); 5,000 training images held out for validation."""
    return Setup(dataset=f"cifar{classes}", model="wrn28_10", epochs=200, batch_size=128,
                 val_size=5000, weight_decay=5e-4, schedule="step", milestones=(60, 120, 160),
                 lr_decay=0.2, data_dir=data_dir, engine="run")


def get_model(name: str, num_classes: int):
    """``small_cnn``: pae's ConvNet with 3x3 convs 16,16 | pool | 32,32 | pool, FC 64 (25,274
    params on 8x8 digits). Any other name goes to ``pae.models.get_model``."""
    if name == "small_cnn":
        return pmodels.ConvNet(stages=(16, 32), fc=(64,), num_classes=num_classes)
    return pmodels.get_model(name, num_classes)


# ----------------------------------------------------------------------------------------------
# Optimizer factories (all take learning_rate first; weight decay is L2, as in both papers' code)
# ----------------------------------------------------------------------------------------------


def adam_l2(learning_rate, eps=1e-8, weight_decay=0.0, b1=0.9, b2=0.999):
    """PyTorch Adam with L2 weight decay (``torch.optim.Adam(weight_decay=...)``); eps outside sqrt."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


def avagrad_l2(learning_rate, eps=0.1, weight_decay=0.0, b1=0.9, b2=0.999):
    return po.avagrad(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


GRID_OPTIMIZERS = {"adam": adam_l2, "avagrad": avagrad_l2}


# gamma * (number of updates) of the report's CIFAR-10 runs: gamma 1e-3, 200 epochs x 391 steps.
REPORT_GAMMA_T = 1e-3 * 200 * 391


def bound_optimizers(weight_decay: float, total_steps: int
                     ) -> dict[str, Callable[[Any], optax.GradientTransformation]]:
    """name -> (lr multiplier schedule -> tx). Base learning rates follow the report.

    ``adabound`` uses the report's gamma = 1e-3. On a short run its bounds are still far from
    final_lr at the end (gamma * T << 1: it is Adam-like throughout), so ``adabound_gammaT`` also
    runs it with gamma scaled to this run's length, gamma * T = 78.2 as in the report's CIFAR runs,
    which is the regime where the report compares it with CSGD.
    """
    gamma_t = min(0.999, REPORT_GAMMA_T / max(total_steps, 1))

    def adabound(gamma):
        return lambda s: po.adabound(lambda t: 1e-3 * s(t), final_lr=0.1, gamma=gamma,
                                     weight_decay=weight_decay, reference_lr=1e-3)

    return {
        "adabound": adabound(1e-3),
        "adabound_gammaT": adabound(gamma_t),
        "csgd": lambda s: po.csgd(lambda t: 0.1 * s(t), momentum=0.9, weight_decay=weight_decay),
        "sgd_momentum": lambda s: optax.chain(optax.add_decayed_weights(weight_decay),
                                              optax.sgd(lambda t: 0.1 * s(t), momentum=0.9)),
    }


# ----------------------------------------------------------------------------------------------
# shared engine: one compiled step for every cell
# ----------------------------------------------------------------------------------------------


def set_hyperparams(state, values: dict[str, float]):
    """Write numeric hyperparameters into the ``inject_hyperparams`` state (first chain element)."""
    inject = state.opt_state[0]
    hp = dict(inject.hyperparams)
    for k, v in values.items():
        hp[k] = jnp.asarray(v, hp[k].dtype)
    return state.replace(opt_state=(inject._replace(hyperparams=hp), *state.opt_state[1:]))


def train_cells(model, dataset, tx, states: list, setup: Setup, seed: int, log: str = ""):
    """Train every state in ``states`` as parallel runs of one phase on the engine
    (:func:`pae.train.train_phases`): one ``jax.vmap``-ed program over the cells, on the same batches.

    All cells share ``tx``; what differs between them (initial weights, and hyperparameters that
    live in the optimizer state via ``optax.inject_hyperparams``) is the per-run value, so the phase
    keeps the optimizer state it is given. A cell that diverges keeps going with NaN values
    (``on_diverged="continue"``: some settings of a sweep are expected to). Returns the final (stacked) state and histories of shape
    ``[epochs, cells]``: ``train_loss``, ``val_acc`` (test accuracy when there is no validation
    split) and ``test_acc``.
    """
    task = make_task(model, dataset)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[host(st) for st in states])
    phase = Phase("train", setup.epochs, lambda spe: tx, optimizer_state="keep")
    out = train_phases(task, [phase], states[0], batch_size=setup.batch_size, seed=seed, runs=stacked,
                       setup=lambda state, cell: cell, title=log, on_diverged="continue",
                       log=(lambda line: print(f"  {log} {line}", flush=True)) if log else None)
    val = "val_acc" if "val" in task.evals else "test_acc"
    history = {"train_loss": [r["train_loss"] for r in out.history], "val_acc": [r[val] for r in out.history],
               "test_acc": [r["test_acc"] for r in out.history]}
    return out.state, {k: np.asarray(v, np.float64) for k, v in history.items()}


def lr_multiplier(setup: Setup, steps_per_epoch: int):
    return make_schedule(setup.schedule, 1.0, steps_per_epoch, setup.epochs,
                         milestones=setup.milestones, decay=setup.lr_decay)


def shared_setup(setup: Setup, seed: int):
    """``(dataset, model, example inputs, steps per epoch, lr multiplier)`` of the shared-step drivers."""
    dataset = load(setup, seed)
    steps = pdata.num_batches(len(dataset["train"]), setup.batch_size)
    return (dataset, get_model(setup.model, dataset.num_classes), jnp.asarray(dataset.example_inputs()),
            steps, lr_multiplier(setup, steps))


# ----------------------------------------------------------------------------------------------
# Experiment 1: lr x eps grid
# ----------------------------------------------------------------------------------------------


def grid_shared(setup: Setup, lrs, epss, seeds) -> dict[str, np.ndarray]:
    """Final validation accuracy ``[len(seeds), len(lrs), len(epss)]`` per optimizer (shared step)."""
    dataset, model, example, steps, mult = shared_setup(setup, seeds[0])
    out = {}
    for name, factory in GRID_OPTIMIZERS.items():
        tx = optax.chain(
            optax.inject_hyperparams(factory)(learning_rate=1.0, eps=1.0,
                                              weight_decay=setup.weight_decay),
            optax.scale_by_schedule(mult))
        states = []
        for seed in seeds:
            base = create_train_state(model, tx, example, seed)
            states += [set_hyperparams(base, {"learning_rate": lr, "eps": eps})
                       for lr in lrs for eps in epss]
        began = time.perf_counter()
        _, hist = train_cells(model, dataset, tx, states, setup, seeds[0], log=name)
        out[name] = {
            "val_acc": hist["val_acc"][-1].reshape(len(seeds), len(lrs), len(epss)),
            "train_loss": hist["train_loss"][-1].reshape(len(seeds), len(lrs), len(epss)),
            "seconds": time.perf_counter() - began,
        }
    return out


def grid_run(setup: Setup, lrs, epss, seeds) -> dict[str, np.ndarray]:
    """The same grid with one ``pae.train.run`` per cell (resumable; for large models)."""
    dataset = load(setup, seeds[0])
    steps = pdata.num_batches(len(dataset["train"]), setup.batch_size)
    out = {}
    for name, factory in GRID_OPTIMIZERS.items():
        acc = np.full((len(seeds), len(lrs), len(epss)), np.nan)
        loss = np.full_like(acc, np.nan)
        began = time.perf_counter()
        for s, seed in enumerate(seeds):
            for i, lr in enumerate(lrs):
                for j, eps in enumerate(epss):
                    schedule = make_schedule(setup.schedule, lr, steps, setup.epochs,
                                             milestones=setup.milestones, decay=setup.lr_decay)
                    tx = factory(schedule, eps=eps, weight_decay=setup.weight_decay)
                    final = run_one(setup, tx, seed, f"{name}-lr{lr:g}-eps{eps:g}-seed{seed}")
                    acc[s, i, j] = final.get("val_acc", final.get("test_acc", np.nan))
                    loss[s, i, j] = final.get("train_loss", np.nan)
        out[name] = {"val_acc": acc, "train_loss": loss, "seconds": time.perf_counter() - began}
    return out


def run_one(setup: Setup, tx, seed: int, name: str) -> dict:
    """One ``pae.train.run`` with ``tx`` (its schedule is its own); returns the final record."""
    if setup.model == "small_cnn":
        raise ValueError("the run engine takes a pae.models name (e.g. --model lenet300_100 or "
                         "wrn28_10); small_cnn exists only in the shared engine")
    config = TrainConfig(model=setup.model, dataset=setup.dataset, learning_rate=0.0,
                         epochs=setup.epochs, batch_size=setup.batch_size, val_size=setup.val_size,
                         seed=seed, data_dir=setup.data_dir, name=name)
    result = run(config, tx=tx, workdir=os.path.join(setup.workdir, name), progress=False, quiet=True)
    return result.final


def decoupling_slope(lrs, epss, acc: np.ndarray, floor: float, min_eps: float = 0.0) -> dict:
    """Least-squares slope of log10(best lr) on log10(eps) over the columns with eps >= ``min_eps``
    whose best accuracy is at least ``floor``. ~0: the best lr does not depend on eps
    (axis-aligned); 1: the best lr grows like eps (Adam's diagonal when eps >> sqrt(v))."""
    best, used = [], []
    for j, eps in enumerate(epss):
        col = acc[:, j]
        if eps >= min_eps and np.nanmax(col) >= floor:
            best.append(math.log10(lrs[int(np.nanargmax(col))]))
            used.append(math.log10(eps))
    if len(used) < 2:
        return {"slope": float("nan"), "columns": len(used), "best_log10_lr": best}
    slope = float(np.polyfit(used, best, 1)[0])
    return {"slope": slope, "columns": len(used), "best_log10_lr": best, "log10_eps": used}


def plot_grid(result: dict, lrs, epss, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(GRID_OPTIMIZERS)
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 5.0), constrained_layout=True)
    for ax, name in zip(axes, names):
        acc = result[name]["val_acc"].mean(axis=0)
        image = ax.imshow(acc, origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        best = np.nanmax(acc)
        for i in range(len(lrs)):
            for j in range(len(epss)):
                good = acc[i, j] >= best - 0.02
                ax.text(j, i, f"{100 * acc[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="black" if acc[i, j] > 0.6 else "white",
                        fontweight="bold" if good else "normal")
        cols = [j for j in range(len(epss)) if np.nanmax(acc[:, j]) >= 0.5]
        rows = [int(np.nanargmax(acc[:, j])) for j in cols]
        ax.plot(cols, rows, color="red", marker="x", lw=1, label="best lr per eps (acc >= 50%)")
        ax.set_xticks(range(len(epss)), [f"{e:g}" for e in epss], rotation=45)
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_xlabel("epsilon")
        ax.set_ylabel("learning rate")
        slope = result["decoupling"][name]["slope"]
        big = result["decoupling_large_eps"][name]["slope"]
        ax.set_title(f"{name}: val acc % (bold: within 2 points of best)\n"
                     f"d log(best lr) / d log(eps): {slope:.2f} all, {big:.2f} for eps >= 1e-2",
                     fontsize=10)
        ax.legend(loc="upper left", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="final validation accuracy")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Experiment 2: AdaBound vs CSGD vs SGD-momentum
# ----------------------------------------------------------------------------------------------


def bound_shared(setup: Setup, seeds) -> dict:
    dataset, model, example, steps, mult = shared_setup(setup, seeds[0])
    out = {}
    for name, make in bound_optimizers(setup.weight_decay, steps * setup.epochs).items():
        tx = make(mult)
        states = [create_train_state(model, tx, example, seed) for seed in seeds]
        began = time.perf_counter()
        states, hist = train_cells(model, dataset, tx, states, setup, seeds[0], log=name)
        test = hist["test_acc"][-1]
        out[name] = {"val_acc_curve": hist["val_acc"], "train_loss_curve": hist["train_loss"],
                     "val_acc": hist["val_acc"][-1], "test_acc": test,
                     "seconds": time.perf_counter() - began}
    return out


def bound_run(setup: Setup, seeds) -> dict:
    dataset = load(setup, seeds[0])
    steps = pdata.num_batches(len(dataset["train"]), setup.batch_size)
    mult = lr_multiplier(setup, steps)
    out = {}
    for name, make in bound_optimizers(setup.weight_decay, steps * setup.epochs).items():
        finals = [run_one(setup, make(mult), seed, f"{name}-seed{seed}") for seed in seeds]
        out[name] = {"val_acc": np.array([f.get("val_acc", np.nan) for f in finals]),
                     "test_acc": np.array([f.get("test_acc", np.nan) for f in finals])}
    return out


def plot_bound(result: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    curves = all("val_acc_curve" in r for r in result.values())
    for k, (name, r) in enumerate(result.items()):
        test = 100 * np.asarray(r["test_acc"])
        label = f"{name}: test {test.mean():.1f} +- {test.std():.1f}"
        if curves:
            curve = 100 * r["val_acc_curve"]
            epochs = np.arange(1, len(curve) + 1)
            mean, std = curve.mean(axis=1), curve.std(axis=1)
            ax.plot(epochs, mean, label=label)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        else:  # run engine: final numbers only
            ax.bar(k, test.mean(), yerr=test.std(), label=label)
    if curves:
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy % (mean +- std over seeds)")
    else:
        ax.set_xticks(range(len(result)), list(result))
        ax.set_ylabel("test accuracy % (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------


def load(setup: Setup, seed: int):
    return pdata.load_dataset(setup.dataset, data_dir=setup.data_dir, val_size=setup.val_size,
                              seed=seed)


def to_json(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: to_json(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [to_json(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return tree.tolist()
    if isinstance(tree, (np.floating, np.integer)):
        return tree.item()
    return tree


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def replot(out: str) -> dict:
    """Redraw ``<out>grid.png`` / ``<out>bound.png`` from their JSON records."""
    records = {}
    for kind in ("grid", "bound"):
        path = out + kind + ".json"
        if not os.path.exists(path):
            continue
        with open(path) as f:
            record = json.load(f)
        setup = record["setup"]
        tag = f"{setup['model']} on {setup['dataset']}, {setup['epochs']} epochs"
        if kind == "grid":
            result = {k: ({kk: np.asarray(vv) for kk, vv in v.items()} if k in GRID_OPTIMIZERS else v)
                      for k, v in record.items()}
            plot_grid(result, record["lrs"], record["epss"], out + "grid.png", f"lr x eps grid: {tag}")
        else:
            result = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in record.items()
                      if isinstance(v, dict) and "test_acc" in v}
            plot_bound(result, out + "bound.png", f"AdaBound vs CSGD vs SGD-momentum: {tag}")
        records[kind] = record
    return records


def main(argv: Sequence[str] | None = None) -> dict:
    from pae.train.cli import one_line_errors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=("grid", "bound", "all"), default="all")
    parser.add_argument("--paper-cifar", type=int, choices=(10, 100), default=None,
                        help="WRN-28-10 on CIFAR-10/100 with the paper's 200-epoch schedule")
    parser.add_argument("--data-dir", default=None, help="tfds data directory (CIFAR)")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--engine", choices=("shared", "run"), default=None)
    parser.add_argument("--lrs", type=parse_floats, default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    parser.add_argument("--epss", type=parse_floats, default=[1e-8, 1e-6, 1e-4, 1e-2, 1.0, 100.0])
    parser.add_argument("--grid-seeds", type=int, default=1)
    parser.add_argument("--bound-seeds", type=int, default=3)
    parser.add_argument("--workdir", default="runs/optimizers", help="run engine: run directories")
    parser.add_argument("--out", default="runs/optimizers/optim_",
                        help="output path prefix (the recorded results: --out experiments/results/optim_)")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the figures from the JSON files of an earlier run")
    args = one_line_errors(parser).parse_args(argv)
    if args.plot_only:
        return replot(args.out)

    setup = Setup() if args.paper_cifar is None else paper_cifar_setup(args.paper_cifar, args.data_dir)
    overrides = {k: v for k, v in {"dataset": args.dataset, "model": args.model,
                                   "epochs": args.epochs, "batch_size": args.batch_size,
                                   "engine": args.engine, "data_dir": args.data_dir}.items()
                 if v is not None}
    setup = dataclasses.replace(setup, workdir=args.workdir, **overrides)
    tag = f"{setup.model} on {setup.dataset}, {setup.epochs} epochs"
    print(f"setup: {setup}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    summary = {}

    if args.experiment in ("grid", "all"):
        seeds = list(range(args.grid_seeds))
        began = time.perf_counter()
        fn = grid_shared if setup.engine == "shared" else grid_run
        result = fn(setup, args.lrs, args.epss, seeds)
        result["decoupling"] = {
            name: decoupling_slope(args.lrs, args.epss, result[name]["val_acc"].mean(axis=0),
                                   floor=0.5)
            for name in GRID_OPTIMIZERS}
        result["decoupling_large_eps"] = {  # the eps >> sqrt(v) regime of the paper's argument
            name: decoupling_slope(args.lrs, args.epss, result[name]["val_acc"].mean(axis=0),
                                   floor=0.5, min_eps=1e-2)
            for name in GRID_OPTIMIZERS}
        record = {"setup": dataclasses.asdict(setup), "lrs": args.lrs, "epss": args.epss,
                  "seeds": seeds, "seconds": time.perf_counter() - began, **result}
        with open(args.out + "grid.json", "w") as f:
            json.dump(to_json(record), f, indent=1)
        plot_grid(result, args.lrs, args.epss, args.out + "grid.png", f"lr x eps grid: {tag}")
        for name in GRID_OPTIMIZERS:
            acc = result[name]["val_acc"].mean(axis=0)
            i, j = np.unravel_index(np.nanargmax(acc), acc.shape)
            d, big = result["decoupling"][name], result["decoupling_large_eps"][name]
            best = [f"{args.lrs[int(np.nanargmax(acc[:, c]))]:g}" if np.nanmax(acc[:, c]) >= 0.5
                    else "-" for c in range(len(args.epss))]
            print(f"grid {name}: best val acc {acc[i, j]:.3f} at lr={args.lrs[i]:g} "
                  f"eps={args.epss[j]:g}; best lr per eps {best}; slope(log best lr ~ log eps) "
                  f"= {d['slope']:.2f} over {d['columns']} columns, {big['slope']:.2f} for "
                  f"eps >= 1e-2")
        summary["grid"] = record

    if args.experiment in ("bound", "all"):
        seeds = list(range(args.bound_seeds))
        began = time.perf_counter()
        fn = bound_shared if setup.engine == "shared" else bound_run
        result = fn(setup, seeds)
        record = {"setup": dataclasses.asdict(setup), "seeds": seeds,
                  "seconds": time.perf_counter() - began, **result}
        with open(args.out + "bound.json", "w") as f:
            json.dump(to_json(record), f, indent=1)
        plot_bound(result, args.out + "bound.png", f"AdaBound vs CSGD vs SGD-momentum: {tag}")
        for name, r in result.items():
            print(f"bound {name}: val acc {100 * np.mean(r['val_acc']):.2f} +- "
                  f"{100 * np.std(r['val_acc']):.2f}, test acc {100 * np.mean(r['test_acc']):.2f}"
                  f" +- {100 * np.std(r['test_acc']):.2f} over {len(seeds)} seeds")
        summary["bound"] = record
    return summary


if __name__ == "__main__":
    from pae.train.cli import run_script

    run_script(main)  # a user error: one "error: ..." line, exit 2 (--traceback: the trace)
