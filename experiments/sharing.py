"""WRN vs SWRN (soft parameter sharing with template banks, Savarese & Maire, arXiv 1902.09701).

At equal depth and width: the unshared WRN-L-w and SWRN-L-w-k for k in ``--ks`` ("L" = one template
per layer of a bank, 2(N-1)), plus SWRN-L-w-``--pull-k`` trained with the recurrence pull
(:func:`pae.sharing.pull_penalty`, weight ``--pull``; 0 skips it). Per method: parameters (the
trained latent's leaves: unshared weights + banks + coefficients), test accuracy over ``--seeds``
(mean and spread; the seeds run in parallel as one vmapped program, same data order, own
initialization), the layer similarity matrices at initialization and after training (seed 0), and
the folded network (:func:`pae.sharing.fold` at ``--fold-tol``, ``merge="mean"``): how many shared
blocks merged into loops and its accuracy change against the soft net (evaluated by the engine's
``evaluate`` on the same test set).

Default (minutes on 2 CPU cores): WRN-28-1 on the embedded 8x8 ``digits`` (1,437 train / 360 test),
15 epochs of the official recipe scaled (SGD Nesterov 0.1, x0.2 at 30/60/80 % of the run, weight
decay 5e-4 on everything but the coefficients). ``--paper``: CIFAR-10 (``--dataset cifar100`` for
CIFAR-100), WRN-28-10, 200 epochs, batch 128, x0.2 at 60/120/160 (needs the tfds data and an
accelerator).

    python experiments/sharing.py                          # WRN-28-1 on digits, 3 seeds
    python experiments/sharing.py --paper --seeds 0        # the paper's CIFAR-10 recipe

Writes ``runs/sharing/sharing_<name>.{json,png}`` (accuracy vs parameters) and
``sharing_<name>_lsm.png`` (the LSMs); ``--out-dir`` elsewhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

import jax
import numpy as np

from pae import sharing as sh
from pae.data import load_dataset
from pae.train import evaluate, init_state, make_task, train_phases
from pae.train.cli import fill_unset
from pae.train.metrics import atomic_write
from pae.train.state import TrainState

DEFAULTS = dict(dataset="digits", depth=28, widen=1, epochs=15, batch_size=64, val_size=0)
PAPER = dict(dataset="cifar10", depth=28, widen=10, epochs=200, batch_size=128, val_size=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", help="default digits (cifar10 with --paper)")
    p.add_argument("--depth", type=int, help="WRN depth 6n+4 (default 28)")
    p.add_argument("--widen", type=int, help="widening factor (default 1; 10 with --paper)")
    p.add_argument("--ks", nargs="+", default=["1", "2", "4", "L"],
                   help="templates per bank; L = one per layer of the bank (default 1 2 4 L)")
    p.add_argument("--pull", type=float, default=1.0,
                   help="weight of the recurrence pull of the extra SWRN (0: no pulled run)")
    p.add_argument("--pull-k", type=int, default=2, help="templates of the pulled SWRN")
    p.add_argument("--fold-tol", type=float, default=1e-2,
                   help="relative tolerance under which consecutive shared blocks fold into a loop")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--val-size", type=int)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--paper", action="store_true",
                   help="CIFAR-10 WRN-28-10, 200 epochs, batch 128, SGD Nesterov 0.1 x0.2 at 60/120/160")
    p.add_argument("--name", default="")
    p.add_argument("--out-dir", default=os.path.join("runs", "sharing"),
                   help="where the results go (default runs/sharing; the recorded results were "
                        "written with --out-dir experiments/results)")
    return p


def resolve(args):
    out = fill_unset(args, PAPER if args.paper else DEFAULTS)
    sh.swrn(out.depth, out.widen, 1)   # validates depth and width
    per_bank = 2 * ((out.depth - 4) // 6 - 1)
    ks = []
    for k in out.ks:
        if str(k).upper() == "L":
            ks.append(per_bank)
        else:
            try:
                ks.append(int(k))
            except ValueError:
                raise ValueError(f"--ks takes ints >= 1 or L, got {k!r}") from None
            if ks[-1] < 1:
                raise ValueError(f"--ks takes ints >= 1 or L, got {k!r}")
    out.ks = list(dict.fromkeys(ks))
    if out.pull < 0 or out.fold_tol < 0:
        raise ValueError("--pull and --fold-tol must be >= 0")
    if len(set(out.seeds)) != len(out.seeds) or min(out.seeds) < 0:
        raise ValueError(f"--seeds must be distinct ints >= 0, got {out.seeds}")
    return out


def methods(args) -> list[dict]:
    out = [{"method": f"WRN-{args.depth}-{args.widen}", "k": None, "pull": 0.0}]
    out += [{"method": f"SWRN-{args.depth}-{args.widen}-{k}", "k": k, "pull": 0.0} for k in args.ks]
    if args.pull > 0:
        out.append({"method": f"SWRN-{args.depth}-{args.widen}-{args.pull_k}+pull", "k": args.pull_k,
                    "pull": args.pull})
    return out


def _one(tree, i):
    return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def run_method(args, spec, dataset, log) -> dict:
    cfg = sh.swrn(args.depth, args.widen, spec["k"] or 1, dataset.num_classes, pull=spec["pull"])
    transform = cfg.transform if spec["k"] else None
    model = cfg.model
    task = make_task(model, dataset, eval_splits=("test",))
    recipe = sh.SharingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              weight_decay=args.weight_decay, seed=args.seeds[0])
    init = transform.init if transform else None
    start = init_state(model, task.example, args.seeds[0], init)
    seeds = np.asarray(args.seeds, np.int32)

    def setup(state, seed):
        return init_state(model, task.example, seed, init)

    began = time.perf_counter()
    result = train_phases(task, sh.sharing_phases(recipe, transform, eval_every=0), start,
                          batch_size=args.batch_size, seed=args.seeds[0], runs=seeds, setup=setup,
                          log=lambda m: log(f"{spec['method']}: {m}"))
    seconds = time.perf_counter() - began
    last = result.history[-1]
    state = jax.device_get(result.state)
    out = {**spec, "params": sh.num_parameters(_one(state.params, 0)), "seeds": list(args.seeds),
           "test_acc": [float(a) for a in last["test_acc"]], "train_seconds": seconds}
    if not transform:
        return out
    init0 = setup(None, args.seeds[0]).params
    out["lsm_init"] = {g: np.asarray(s).tolist() for g, s in sh.layer_similarity(init0).items()}
    out["lsm_trained"] = {g: np.asarray(s).tolist()
                          for g, s in sh.layer_similarity(_one(state.params, 0)).items()}
    out["labels"] = sh.layer_paths(init0)
    folded_acc, merged, warned, soft_check, distances = [], [], [], [], []
    for i in range(len(args.seeds)):
        latent, stats = _one(state.params, i), _one(state.batch_stats, i)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            f = sh.fold(cfg, latent, stats, tol=args.fold_tol, merge="mean")
        warned.append(len(caught))
        merged.append(sum(cfg.blocks - 1 - len(runs) for runs in f.runs))
        distances.append({s: [float(d) for d in ds] for s, ds in f.distances.items()})
        one = TrainState(step=np.zeros((), np.int32), params=f.variables["params"],
                         batch_stats=f.variables["batch_stats"], opt_state=None, key=np.zeros(2, np.uint32))
        folded_acc.append(evaluate(dataclasses.replace(task, model=f.model), one,
                                   batch_size=args.batch_size)["test_acc"])
        soft = TrainState(step=np.zeros((), np.int32), params=sh.build(latent), batch_stats=stats,
                          opt_state=None, key=np.zeros(2, np.uint32))
        soft_check.append(evaluate(task, soft, batch_size=args.batch_size)["test_acc"])
    out.update(folded_acc=folded_acc, merged_blocks=merged, fold_warnings=warned,
               fold_distances=distances, soft_acc_recomputed=soft_check,
               loops=[list(r) for r in f.model.stage_loops()])
    return out


def summarize(rows, args) -> dict:
    base = rows[0]
    acc0 = float(np.mean(base["test_acc"]))
    table = []
    for r in rows:
        a = np.asarray(r["test_acc"])
        row = {"method": r["method"], "params": r["params"], "ratio": base["params"] / r["params"],
               "acc": float(a.mean()), "acc_std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
               "gap_pts": 100 * (float(a.mean()) - acc0)}
        if "folded_acc" in r:
            row["folded_acc"] = float(np.mean(r["folded_acc"]))
            row["fold_change_pts"] = 100 * float(np.mean(np.asarray(r["folded_acc"]) - a))
            row["merged_blocks"] = float(np.mean(r["merged_blocks"]))
        table.append(row)
    ok_share = [t for t in table[1:] if "+pull" not in t["method"] and t["ratio"] >= 2.0
                and t["gap_pts"] >= -1.0]
    pulled = [t for t in table if "+pull" in t["method"]]
    merged = [t for t in table if t.get("merged_blocks", 0) > 0]
    return {"table": table, "targets": {
        "swrn_within_1pt_with_2x_fewer_params": bool(ok_share),
        "which": [t["method"] for t in ok_share],
        "fold_change_below_0.5pt_where_blocks_merged": bool(merged) and all(
            abs(t["fold_change_pts"]) < 0.5 for t in merged),
        "merged": {t["method"]: t["merged_blocks"] for t in merged},
        "pulled": pulled[0] if pulled else None}}


def text_table(table) -> str:
    lines = [f"{'method':<20}{'params':>10}{'saving':>8}{'test acc':>18}{'vs WRN':>9}"
             f"{'folded':>9}{'change':>9}{'merged':>8}"]
    for t in table:
        fold = (f"{t['folded_acc']:>9.4f}{t['fold_change_pts']:>+8.2f}p{t['merged_blocks']:>8.1f}"
                if "folded_acc" in t else "")
        lines.append(f"{t['method']:<20}{t['params']:>10,}{t['ratio']:>7.2f}x"
                     f"{t['acc']:>11.4f} ±{t['acc_std']:.4f}{t['gap_pts']:>+8.2f}p{fold}")
    return "\n".join(lines)


def plot(summary, rows, args, base):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for t, r in zip(summary["table"], rows):
        ax.errorbar(t["params"], 100 * t["acc"], yerr=100 * t["acc_std"], fmt="o" if r["k"] else "s",
                    capsize=3, label=t["method"])
        if "folded_acc" in t and t["merged_blocks"] > 0:
            ax.plot(t["params"], 100 * t["folded_acc"], "x", color="k")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"WRN-{args.depth}-{args.widen} vs SWRN on {args.dataset} ({len(args.seeds)} seeds; "
                 f"x: folded)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=110)
    plt.close(fig)

    shared = [r for r in rows if "lsm_init" in r and r["k"] > 1]
    if not shared:
        return
    stages = sh.STAGES
    fig, axes = plt.subplots(len(shared), 2 * len(stages), figsize=(2.2 * 2 * len(stages), 2.3 * len(shared)),
                             squeeze=False)
    for i, r in enumerate(shared):
        for j, (when, key) in enumerate((("init", "lsm_init"), ("trained", "lsm_trained"))):
            for s, stage in enumerate(stages):
                ax = axes[i][2 * s + j]
                ax.imshow(np.asarray(r[key][stage]), vmin=0, vmax=1, cmap="viridis")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{stage} {when}", fontsize=7)
                if s == 0 and j == 0:
                    ax.set_ylabel(r["method"], fontsize=7)
    fig.suptitle("layer similarity |cos(alpha_i, alpha_j)| (seed 0; 0 dark, 1 yellow)", fontsize=9)
    fig.tight_layout()
    fig.savefig(base + "_lsm.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    from pae.train.cli import one_line_errors

    args = resolve(one_line_errors(build_parser()).parse_args(argv))
    name = args.name or f"wrn{args.depth}_{args.widen}_{args.dataset}"
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"sharing_{name}")
    dataset = load_dataset(args.dataset, val_size=args.val_size, seed=0)
    log = lambda m: print(m, flush=True)  # noqa: E731
    began = time.perf_counter()
    rows = [run_method(args, spec, dataset, log) for spec in methods(args)]
    summary = summarize(rows, args)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out_dir", "name")},
              "rows": rows, **summary, "seconds": time.perf_counter() - began,
              "loadavg": os.getloadavg()}
    atomic_write(base + ".json", json.dumps(result, indent=2, default=float))
    plot(summary, rows, args, base)
    print(text_table(summary["table"]))
    print(json.dumps(summary["targets"], default=float))
    print(f"total {result['seconds']:.0f} s, load average {result['loadavg']}")
    print(f"wrote {base}.json, {base}.png and {base}_lsm.png")
    return result


if __name__ == "__main__":
    from pae.train.cli import run_script

    run_script(main, sys.argv[1:])
