"""Lottery-ticket search: Continuous Sparsification vs iterative magnitude pruning (IMP).

Default (minutes on 2 CPU cores): LeNet-300-100 on the 5,000 embedded MNIST digits. CS runs several
``s_init`` values *in parallel* (one vmapped program; one sparsity level each), R rounds of E epochs;
each ticket (hard mask on the weights rewound to epoch ``rewind_epoch`` of round 0) is retrained for
E epochs. Baselines: IMP (20% of the remaining weights per round, same rewind point, same epochs per
round), the CS tickets' masks on randomly re-initialized weights, and the dense model.

    python experiments/tickets.py                          # LeNet-300-100, mnist_subset
    python experiments/tickets.py --model conv2            # Conv-2 (or conv4)
    python experiments/tickets.py --paper                  # CIFAR-10 ResNet-20, the official protocol

Writes ``experiments/results/tickets_<name>.{json,png}`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from pae import sparsity as sp
from pae.core import select as S
from pae.data import load_dataset
from pae.models import get_model
from pae.train import data_mesh

SELECTORS = {"kernels": S.kernels, "conv3x3": lambda: S.conv_kernels((3, 3))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lenet300_100")
    p.add_argument("--dataset", default="mnist_subset")
    p.add_argument("--val-size", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10, help="per round, per IMP round, per ticket")
    p.add_argument("--rewind-epoch", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--mask-lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--milestones", type=int, nargs="*", default=[7])
    p.add_argument("--beta-final", type=float, default=200.0)
    p.add_argument("--lmbda", type=float, default=1e-8)
    p.add_argument("--reset", choices=sp.RESET_RULES, default="paper")
    p.add_argument("--unscaled", action="store_true", help="drop the 1/sigmoid(s_init) mask scale")
    p.add_argument("--ticket-mask", choices=sp.search.TICKET_MASKS, default="binary",
                   help="binary: 1[s>0] on the rewound weights (default here: LeNet/Conv nets have no "
                        "BN to absorb the official 1/sigmoid(s_init) scale); finalize: the official mask")
    p.add_argument("--s-inits", type=float, nargs="+", default=[-0.04, -0.02, -0.01, 0.0, 0.01])
    p.add_argument("--imp-levels", type=int, default=20, help="IMP rounds (density 0.8**k)")
    p.add_argument("--imp-scope", choices=sp.SCOPES, default="global")
    p.add_argument("--select", choices=sorted(SELECTORS), default="kernels")
    p.add_argument("--no-reinit", action="store_true", help="skip the random re-init control")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--paper", action="store_true",
                   help="CIFAR-10 ResNet-20: 3 rounds x 85 epochs, SGD 0.1 Nesterov, decays at 56/71, "
                        "beta 1->200, 45k/5k split, masks on 3x3 convs only")
    return p


PAPER_FLAGS = dict(model="resnet20", dataset="cifar10", val_size=5000, rounds=3, epochs=85,
                   rewind_epoch=2, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                   milestones=[56, 71], beta_final=200.0, lmbda=1e-8, select="conv3x3",
                   ticket_mask="finalize",
                   s_inits=[-0.1, -0.05, 0.0, 0.05, 0.1], imp_levels=10)


def run(args) -> dict:
    if args.paper:
        for k, v in PAPER_FLAGS.items():
            setattr(args, k, v)
    cfg = sp.SearchConfig(rounds=args.rounds, epochs=args.epochs, rewind_epoch=args.rewind_epoch,
                          batch_size=args.batch_size, lr=args.lr, mask_lr=args.mask_lr,
                          momentum=args.momentum, weight_decay=args.weight_decay,
                          milestones=tuple(args.milestones), beta_final=args.beta_final,
                          lmbda=args.lmbda, reset=args.reset, scaled=not args.unscaled,
                          ticket_mask=args.ticket_mask,
                          prune_scope=args.imp_scope, seed=args.seed)
    dataset = load_dataset(args.dataset, val_size=args.val_size, seed=args.seed)
    task = sp.make_task(get_model(args.model, dataset.num_classes), dataset, data_mesh())
    select = SELECTORS[args.select]()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    timings = {}

    t0 = time.perf_counter()
    dense = sp.train_dense(task, cfg, log)
    timings["dense"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    search = sp.cs_search(task, cfg, list(args.s_inits), select, log)
    tickets = sp.cs_ticket(search, cfg, list(args.s_inits))
    trained = sp.train_masked(task, cfg, tickets, search.rewind_batch_stats, batched=True, log=log)
    timings["cs"] = time.perf_counter() - t0
    cs_rows = [{"method": "CS", "s_init": s0, "density": trained["density"][i],
                "test_acc": trained["test_acc"][i], "soft_test_acc": search.history[-1]["soft_test_acc"][i],
                "epochs": (cfg.rounds + 1) * cfg.epochs} for i, s0 in enumerate(args.s_inits)]

    reinit_rows = []
    if not args.no_reinit:
        t0 = time.perf_counter()
        import jax
        stacked = []
        for i in range(len(args.s_inits)):
            one = jax.tree.map(lambda x: np.asarray(x)[i], tickets)
            stacked.append(sp.random_reinit(task, one, seed=args.seed + 1000 + i))
        latents = jax.tree.map(lambda *xs: np.stack(xs), *[s[0] for s in stacked])
        stats = jax.tree.map(lambda *xs: np.stack(xs), *[s[1] for s in stacked])
        out = sp.train_masked(task, cfg, latents, stats, batched=True, log=log)
        reinit_rows = [{"method": "random reinit", "s_init": s0, "density": out["density"][i],
                        "test_acc": out["test_acc"][i], "epochs": (cfg.rounds + 1) * cfg.epochs}
                       for i, s0 in enumerate(args.s_inits)]
        timings["reinit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    imp = sp.imp_search(task, cfg, args.imp_levels, select, log)
    timings["imp"] = time.perf_counter() - t0
    imp_rows = [{"method": "IMP", **r} for r in imp]

    rows = [{"method": "dense", **dense}] + cs_rows + reinit_rows + imp_rows
    result = {"config": {k: v for k, v in vars(args).items()}, "rows": rows, "timings_s": timings,
              "masked_weights": sp.masked_count(tickets) // len(args.s_inits),
              "cs_history": search.history}
    result["targets"] = check_targets(rows)
    return result


def _interp_imp(imp_rows, density):
    """IMP accuracy at ``density`` by linear interpolation in log-density between its levels."""
    d = np.array([r["density"] for r in imp_rows])[::-1]
    a = np.array([r["test_acc"] for r in imp_rows])[::-1]
    if density < d.min() or density > d.max():
        return None
    return float(np.interp(np.log(density), np.log(d), a))


def _epochs_imp(imp_rows, density):
    reached = [r["epochs"] for r in imp_rows if r["density"] <= density + 1e-9]
    return min(reached) if reached else None


def check_targets(rows) -> dict:
    dense = next(r for r in rows if r["method"] == "dense")
    cs = [r for r in rows if r["method"] == "CS"]
    imp = [r for r in rows if r["method"] == "IMP"]
    sparse = [r for r in cs if r["density"] <= 0.10]
    best = max(sparse, key=lambda r: r["test_acc"]) if sparse else None
    comparisons = []
    for r in cs:
        ref = _interp_imp(imp, r["density"])
        comparisons.append({"density": r["density"], "cs": r["test_acc"], "imp_interp": ref,
                            "cs_epochs": r["epochs"], "imp_epochs": _epochs_imp(imp, r["density"])})
    matched = [c for c in comparisons if c["imp_interp"] is not None]
    return {
        "cs_90pct_sparse_within_1pt_of_dense": bool(best and best["test_acc"] >= dense["test_acc"] - 0.01),
        "best_cs_at_90pct": best,
        "cs_at_or_above_imp_at_matched_density": bool(matched) and all(
            c["cs"] >= c["imp_interp"] - 1e-9 for c in matched),
        "cs_fewer_epochs_than_imp": bool(best) and (_epochs_imp(imp, best["density"]) is None
                                                    or best["epochs"] < _epochs_imp(imp, best["density"])),
        "comparisons": comparisons,
    }


def table(rows) -> str:
    lines = [f"{'method':<14}{'s_init':>8}{'density':>10}{'sparsity':>10}{'test acc':>10}{'epochs':>8}"]
    for r in rows:
        s0 = f"{r['s_init']:+.3f}" if "s_init" in r else ""
        lines.append(f"{r['method']:<14}{s0:>8}{r['density']:>10.4f}{1 - r['density']:>10.2%}"
                     f"{r['test_acc']:>10.4f}{r['epochs']:>8}")
    return "\n".join(lines)


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"CS": "o-", "IMP": "s-", "random reinit": "^--"}
    for method, style in styles.items():
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["density"])
        if not rs:
            continue
        d = [100 * r["density"] for r in rs]
        axes[0].plot(d, [100 * r["test_acc"] for r in rs], style, label=method)
        if method != "random reinit":
            axes[1].plot(d, [r["epochs"] for r in rs], style, label=method)
    dense = next(r for r in rows if r["method"] == "dense")
    axes[0].axhline(100 * dense["test_acc"], color="k", ls=":", label="dense")
    axes[1].axhline(dense["epochs"], color="k", ls=":", label="dense")
    for ax, ylabel in zip(axes, ("test accuracy (%)", "total training epochs spent")):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    result = run(args)
    name = args.name or f"{args.model}_{args.dataset}"
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"tickets_{name}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2, default=float)
    plot(result["rows"], base + ".png", f"{args.model} on {args.dataset}: CS vs IMP tickets")
    print(table(result["rows"]))
    print(json.dumps({k: v for k, v in result["targets"].items() if k != "comparisons"}, default=float))
    print(f"wrote {base}.json and {base}.png")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
