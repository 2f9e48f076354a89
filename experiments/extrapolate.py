"""Algorithmic extrapolation: looped vs feed-forward vs template-bank nets (arXiv 1902.09701, 2202.05826).

Train on small instances, test on larger ones, and report whole-example exact match (every bit of
the prefix parity / every pixel of the maze path right) against the number of test iterations.
Data come from the generators in :mod:`pae.data.algorithmic` (made here, deterministic by seed).

Methods, all with the same per-position block (:mod:`pae.models.looped`: recall conv + residual
basic blocks, DeepThinking's ``dt_net_recall``) and trained on the one engine:

* ``dt``: the DeepThinking recall network (Bansal et al. 2022), one block looped ``--iters`` times,
  progressive loss (``alpha = 1``); tested at many iteration counts (the external anchor).
* ``ff``: the feed-forward net of the same depth and width: ``--iters`` distinct blocks (about
  ``--iters`` times the parameters of ``dt``).
* ``ff_budget``: the same depth at the parameter budget of ``dt`` (narrower blocks).
* ``bank``: the feed-forward net under soft sharing (:func:`pae.sharing.templates`, one bank of
  ``--k`` templates per conv of the block, the layers of iteration d the rows), width chosen for the
  budget of ``dt`` (equal width when ``k = 1``), with the recurrence pull
  (:func:`pae.sharing.pull_penalty`, period 1, weight ``--pull``) so that its iterations coincide;
  tested as trained (``bank``) and folded into one block (:func:`pae.sharing.fold_unrolled`,
  ``bank_folded``) run for more iterations at test time. It trains at full depth, as a
  feed-forward net does (the thesis's setting: a soft-shared net trained normally, then folded).
* ``bank_prog``: the same bank trained with the progressive loss over its distinct blocks
  (:class:`pae.models.looped.UnrolledNet` ``progressive=True``: blocks ``0..n-1`` cut from the
  gradient, ``n..n+k-1`` with it; pae's extension), then folded (``bank_prog_folded``): it asks
  whether DeepThinking's training objective, not the weight tying, is what makes a loop extrapolate.

Optimizer (all methods): DeepThinking's Adam, lr ``--lr`` with a linear warmup over ``--warmup``
epochs, x0.1 at 40 % and 67 % of the run (its 60/100 of 150 epochs), gradient clipping at 1, no
weight decay (coefficients included). The defaults are sized for 2 CPU cores: prefix sums at
width 32, 1 basic block per iteration, 16 iterations, 6,000 strings, 12 epochs, lr 2e-3; mazes at
width 16, 12 iterations, 2,000 mazes of 9x9, 20 epochs, lr 5e-3 (at 8 epochs and 2e-3 the nets
stay at the all-background solution). ``--paper`` is DeepThinking's recipe (prefix sums: width
400, 2 basic blocks, 30 iterations, 10,000 strings, 150 epochs, batch 100; mazes: width 128, 50,000
mazes, 50 epochs).

    python experiments/extrapolate.py                      # prefix sums: 32 bits -> 48, 128, 512
    python experiments/extrapolate.py --task mazes         # mazes: 9x9 -> 13x13, 33x33 (small)

Writes ``runs/extrapolate/extrapolate_<task>.{json,png}`` (``--out-dir`` elsewhere) and prints a
table: per method and test size, exact match at each test iteration count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pae import sharing as sh
from pae.data import algorithmic as alg
from pae.models.looped import LoopedNet, UnrolledNet, block_groups, iterate
from pae.train import Phase, init_state, make_task, train_phases
from pae.train.metrics import atomic_write

METHODS = ("dt", "ff", "ff_budget", "bank", "bank_prog")
TASKS = ("prefix_sums", "mazes")

DEFAULTS = {
    "prefix_sums": dict(width=32, blocks=1, iters=16, train_size=6000, test_size=500, long_test_size=100,
                        epochs=12, batch_size=50, lr=2e-3, warmup=1, train_sizes=32,
                        test_sizes=[48, 128, 512], test_iters=[8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 640]),
    "mazes": dict(width=16, blocks=1, iters=12, train_size=2000, test_size=100, long_test_size=50,
                  epochs=20, batch_size=25, lr=5e-3, warmup=1, train_sizes=9,
                  test_sizes=[13, 33], test_iters=[6, 12, 18, 24, 36, 48, 72, 96, 144, 192]),
}
PAPER = {
    "prefix_sums": dict(width=400, blocks=2, iters=30, train_size=10000, test_size=10000, long_test_size=1000,
                        epochs=150, batch_size=100, lr=1e-3, warmup=5, train_sizes=32,
                        test_sizes=[48, 128, 512], test_iters=[30, 40, 60, 100, 200, 300, 500, 700]),
    "mazes": dict(width=128, blocks=2, iters=30, train_size=50000, test_size=10000, long_test_size=1000,
                  epochs=50, batch_size=50, lr=1e-3, warmup=10, train_sizes=9,
                  test_sizes=[13, 33, 59], test_iters=[30, 50, 100, 200, 300, 500, 1000]),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=TASKS, default="prefix_sums")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--width", type=int, help="channels of dt (default 32; 16 for mazes)")
    p.add_argument("--blocks", type=int, help="residual basic blocks per iteration (default 1)")
    p.add_argument("--iters", type=int, help="training iterations of dt = depth of ff/bank (default 16)")
    p.add_argument("--train-size", type=int, help="training examples")
    p.add_argument("--test-size", type=int, help="test examples per size")
    p.add_argument("--long-test-size", type=int, help="test examples for sizes above 128 bits / 33 px")
    p.add_argument("--train-sizes", type=int, help="training bits (32) / maze size (9)")
    p.add_argument("--test-sizes", type=int, nargs="+", help="test bits (48 128 512) / maze sizes")
    p.add_argument("--test-iters", type=int, nargs="+",
                   help="iteration counts of the looped nets at test time (per size, those up to "
                        "max(2 iters, size + iters); mazes: size**2 // 4 + iters)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, help="epochs of linear lr warmup")
    p.add_argument("--k", type=int, default=1, help="templates per bank (default 1: equal width to dt)")
    p.add_argument("--pull", type=float, default=1.0, help="weight of the recurrence pull on the bank")
    p.add_argument("--coefficient-init", choices=sh.COEFFICIENT_INITS, default="unit_rows",
                   help="the bank's coefficients at init (default unit_rows: each layer starts at its "
                        "template's variance, as no BatchNorm follows these convs; orthogonal: the "
                        "official SWRN init, about 1/sqrt(iters) as large)")
    p.add_argument("--templates-from", choices=sh.TEMPLATE_SOURCES, default="layers",
                   help="the bank's templates at init (default layers: the first k blocks' own "
                        "PyTorch-default kernels, DeepThinking's init; he: the official SWRN draw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paper", action="store_true", help="DeepThinking's recipe (needs an accelerator)")
    p.add_argument("--name", default="")
    p.add_argument("--out-dir", default=os.path.join("runs", "extrapolate"),
                   help="where the results go (default runs/extrapolate; the recorded results were "
                        "written with --out-dir experiments/results)")
    return p


def resolve(args):
    base = (PAPER if args.paper else DEFAULTS)[args.task]
    out = argparse.Namespace(**vars(args))
    for key, value in base.items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    for name in ("width", "iters", "train_size", "test_size", "long_test_size", "epochs", "batch_size",
                 "k", "train_sizes"):
        if getattr(out, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(out, name)}")
    if out.blocks < 0 or out.warmup < 0:
        raise ValueError("--blocks and --warmup must be >= 0")
    if not out.lr > 0 or not math.isfinite(out.lr):
        raise ValueError(f"--lr must be > 0, got {out.lr}")
    if out.pull < 0:
        raise ValueError(f"--pull must be >= 0, got {out.pull}")
    if any(t < 1 for t in out.test_iters):
        raise ValueError(f"--test-iters must be >= 1, got {out.test_iters}")
    if out.task == "mazes" and any(s % 2 == 0 for s in [out.train_sizes, *out.test_sizes]):
        raise ValueError("maze sizes must be odd (9, 13, 33, ...)")
    if args.train_size and out.batch_size > out.train_size:
        raise ValueError(f"--batch-size {out.batch_size} exceeds --train-size {out.train_size}")
    return out


def data(args) -> dict:
    """``{"train": ..., "val": ..., <size>: (x, y)}`` (val: fresh examples of the training size)."""
    small = args.train_sizes
    if args.task == "prefix_sums":
        make = lambda n, s, seed: alg.prefix_sums(n, s, seed)  # noqa: E731
    else:
        make = lambda n, s, seed: alg.mazes(n, s, seed)  # noqa: E731
    out = {"train": make(args.train_size, small, args.seed), "val": make(args.test_size, small, args.seed + 1)}
    for s in args.test_sizes:
        long_ = s > (128 if args.task == "prefix_sums" else 33)
        out[s] = make(args.long_test_size if long_ else args.test_size, s, args.seed + 1)
    return out


def optimizer(args):
    def make(spe):
        total = args.epochs * spe
        warm = min(args.warmup * spe, max(total - 1, 0))
        steps = {int(0.4 * total): 0.1, int(2 * total / 3): 0.1}
        decay = optax.piecewise_constant_schedule(args.lr, {k - warm: v for k, v in steps.items() if k > warm})
        sched = optax.join_schedules([optax.linear_schedule(args.lr / max(warm, 1), args.lr, warm), decay],
                                     [warm]) if warm else decay
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    return make


def count(tree) -> int:
    return sh.num_parameters(tree)


def budget_width(args, in_ch: int, target: int, spatial: int, blocks_count: int, recall=True) -> int:
    """The widest width whose unrolled net (``blocks_count`` distinct blocks) has <= ``target``
    parameters (shapes only)."""
    best = 1
    for w in range(1, args.width + 1):
        m = UnrolledNet(w, blocks_count, args.blocks, recall)
        shape = (1,) + (8,) * spatial + (in_ch,)
        v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
        if count(v["params"]) <= target:
            best = w
    return best


def exact(logits_fn, x, y, chunk=250) -> float:
    hits = []
    for i in range(0, len(x), chunk):
        logits = logits_fn(jnp.asarray(x[i:i + chunk]))
        hits.append(np.all((np.asarray(logits).argmax(-1) == y[i:i + chunk]).reshape(len(logits), -1), 1))
    return float(np.concatenate(hits).mean())


def curve(model: LoopedNet, params, x, y, iters, chunk=250) -> dict:
    """``{n: exact match after n iterations}`` in one pass per chunk."""
    hits = {n: [] for n in iters}
    for i in range(0, len(x), chunk):
        outs = iterate(model, params, jnp.asarray(x[i:i + chunk]), iters)
        for n, logits in outs.items():
            hits[n].append(np.all((np.asarray(logits).argmax(-1) == y[i:i + chunk]).reshape(len(logits), -1), 1))
    return {int(n): float(np.concatenate(h).mean()) for n, h in hits.items()}


def test_iters_for(args, size: int) -> list[int]:
    """The test iteration counts used at ``size``: up to ``max(2 iters, longest + iters)``, where
    ``longest`` bounds how far information must travel (a string's length; a maze path's pixels,
    up to about ``size**2 / 2``, of which ``size**2 / 4`` is used)."""
    longest = size if args.task == "prefix_sums" else size * size // 4
    cap = max(2 * args.iters, longest + args.iters)
    its = sorted({n for n in args.test_iters if n <= cap} | {args.iters})
    return its


def run_method(args, method: str, splits: dict, log) -> dict:
    x0 = splits["train"][0]
    spatial, in_ch = x0.ndim - 2, x0.shape[-1]
    dt_model = LoopedNet(args.width, args.iters, args.blocks)
    dt_params = jax.eval_shape(lambda: dt_model.init(jax.random.PRNGKey(0), jnp.asarray(x0[:1])))["params"]
    budget = count(dt_params)
    transform, pulled = None, None
    if method == "dt":
        model = dt_model
    elif method == "ff":
        model = UnrolledNet(args.width, args.iters, args.blocks)
    elif method == "ff_budget":
        model = UnrolledNet(budget_width(args, in_ch, budget, spatial, args.iters), args.iters, args.blocks)
    else:
        width = budget_width(args, in_ch, budget, spatial, args.k) if args.k > 1 else args.width
        model = UnrolledNet(width, args.iters, args.blocks, progressive=method == "bank_prog")
        transform = sh.templates(block_groups(args.blocks), args.k, pull=args.pull, pull_period=1,
                                 coefficient_init=args.coefficient_init, templates_from=args.templates_from)
    task = make_task(model, {"train": splits["train"], "val": splits["val"]})
    state = init_state(model, task.example, args.seed, transform.init if transform else None)
    phase = Phase("train", args.epochs, optimizer(args), **({"transform": transform} if transform else {}),
                  eval_every=max(args.epochs // 4, 1))
    began = time.perf_counter()
    result = train_phases(task, [phase], state, batch_size=args.batch_size, seed=args.seed,
                          log=lambda m: log(f"{method}: {m}"))
    seconds = time.perf_counter() - began
    latent = jax.device_get(result.state.params)
    params = sh.build(latent) if transform else latent
    out = {"method": method, "width": model.width, "params": count(latent), "budget": budget,
           "train_seconds": seconds, "val_token_acc": result.history[-1]["val_acc"], "sizes": {}}
    sizes = [args.train_sizes] + list(args.test_sizes)
    xy = {args.train_sizes: splits["val"], **{s: splits[s] for s in args.test_sizes}}
    if method == "dt":
        for s in sizes:
            out["sizes"][str(s)] = curve(model, params, *xy[s], test_iters_for(args, s))
    else:
        apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
        for s in sizes:
            out["sizes"][str(s)] = {args.iters: exact(lambda x: apply(params, x), *xy[s])}
    if method in ("bank", "bank_prog"):
        out["coefficients"] = {g: np.asarray(a).tolist() for g, (_, a) in sh.coefficient_matrices(latent).items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            looped, fparams, dist = sh.fold_unrolled(model, latent, tol=1e-2)
        out["fold_distance"] = dist
        out["fold_warning"] = "; ".join(str(w.message) for w in caught)
        folded = {"method": f"{method}_folded", "width": model.width, "params": count(fparams),
                  "budget": budget, "fold_distance": dist, "sizes": {}}
        for s in sizes:
            folded["sizes"][str(s)] = curve(looped, fparams, *xy[s], test_iters_for(args, s))
        return [out, folded]
    return [out]


def best(sizes: dict) -> dict:
    return {s: max(c.values()) for s, c in sizes.items()}


def table(rows, args) -> str:
    sizes = [str(args.train_sizes)] + [str(s) for s in args.test_sizes]
    unit = "bits" if args.task == "prefix_sums" else "px"
    head = f"{'method':<18}{'width':>6}{'params':>9}" + "".join(f"{s + ' ' + unit:>22}" for s in sizes)
    lines = [head, " " * 33 + "".join(f"{'exact @ its (best @ its)':>22}" for _ in sizes)]
    for r in rows:
        cells = []
        for s in sizes:
            c = {int(k): v for k, v in r["sizes"][s].items()}
            at = c.get(args.iters, next(iter(c.values())))
            n_best = max(c, key=c.get)
            cells.append(f"{at:.3f} ({c[n_best]:.3f} @ {n_best})")
        lines.append(f"{r['method']:<18}{r['width']:>6}{r['params']:>9}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def plot(rows, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [str(args.train_sizes)] + [str(s) for s in args.test_sizes]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.4), squeeze=False)
    for ax, s in zip(axes[0], sizes):
        for r in rows:
            c = {int(k): v for k, v in r["sizes"][s].items()}
            its = sorted(c)
            style = "o-" if len(its) > 1 else "s"
            ax.plot(its, [100 * c[n] for n in its], style, label=f"{r['method']} ({r['params']:,})")
        ax.axvline(args.iters, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"{s} {'bits' if args.task == 'prefix_sums' else 'px mazes'}")
        ax.set_xlabel("test iterations")
        ax.set_ylabel("exact match (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{args.task}: trained on {args.train_sizes}, {args.iters} iterations "
                 f"(dotted); parameters in the legend")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(rows, args) -> dict:
    if args.task != "prefix_sums" or 48 not in args.test_sizes:
        return {}
    by = {r["method"]: r for r in rows}
    loop_best = max((max(by[m]["sizes"]["48"].values()) for m in ("dt", "bank_folded", "bank_prog_folded") if m in by), default=None)
    ff = [max(by[m]["sizes"]["48"].values()) for m in ("ff", "ff_budget") if m in by]
    return {"looped_48bit_exact": loop_best, "ff_48bit_exact": max(ff) if ff else None,
            "looped_solves_90pct_of_48bit": bool(loop_best is not None and loop_best >= 0.9),
            "ff_far_below_looped": bool(loop_best is not None and ff and max(ff) <= loop_best - 0.3)}


def main(argv=None) -> dict:
    from pae.train.cli import one_line_errors

    args = resolve(one_line_errors(build_parser()).parse_args(argv))
    name = args.name or args.task
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"extrapolate_{name}")
    log = lambda m: print(m, flush=True)  # noqa: E731
    began = time.perf_counter()
    splits = data(args)
    rows = []
    for method in args.methods:
        rows += run_method(args, method, splits, log)
    config = {k: v for k, v in vars(args).items() if k not in ("out_dir", "name")}
    result = {"config": config, "rows": rows, "targets": targets(rows, args),
              "seconds": time.perf_counter() - began, "loadavg": os.getloadavg()}
    atomic_write(base + ".json", json.dumps(result, indent=2, default=float))
    plot(rows, args, base + ".png")
    print(table(rows, args))
    print(json.dumps(result["targets"]))
    print(f"total {result['seconds']:.0f} s, load average {result['loadavg']}")
    print(f"wrote {base}.json and {base}.png")
    return result


if __name__ == "__main__":
    from pae.train.cli import run_script

    run_script(main, sys.argv[1:])
