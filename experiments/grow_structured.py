"""Growing networks by structured continuous sparsification (arXiv 2007.15353) vs its baselines.

Per model and seed, side by side on the same data, epochs and seeds:

* ``full``: the full net, trained for ``--epochs`` (L2 + Nesterov SGD, step decays at 56/85 and
  71/85 of the epochs: the weights' optimizer of the search);
* ``grown``: the structured search from the seed (25% width, one block per stage) under a FLOPs
  ``--budget``, trained on the *compacted* net: restructured at ``--restructure-at`` epochs to its
  active channels plus ``--margin`` of each group (regrowth allowed,
  :func:`pae.growth.structured.structured_search`; optimizer momentum carried), then extracted
  (``pae.growth.extract``) and evaluated with no fine-tuning;
* ``uniform``: the full net uniformly thinned to the grown net's inference FLOPs, trained from
  scratch for ``--epochs``. Uniform: one fraction ``r`` for every layer, a group of original width
  ``n`` at ``r n`` rounded down or up (``|w(n) - r n| < 1``, groups of equal ``n`` equally wide);
  of all such nets the one whose inference FLOPs are nearest the grown net's
  (:func:`uniform_nearest`). Rounding every width the same way moves the FLOPs in steps too
  coarse on narrow nets (ResNet-20 at (8, 16, 32): 0.444, then above 0.5), so equal FLOPs needs the
  per-width rounding;
* ``slimming``: network slimming (Liu et al. 2017), the pruning peer: ``--epochs`` minus
  ``--slim-finetune`` epochs with an L1 penalty ``--slim-l1 * sum|gamma|`` on the BatchNorm scales,
  channels pruned by a global threshold on ``|gamma|`` (a residual stream by the mean ``|gamma|`` of
  its BatchNorms) to the grown net's inference FLOPs, then ``--slim-finetune`` epochs of fine-tuning
  at a tenth of the lr (so the same total epochs).

Measured: inference FLOPs (multiply-accumulates of convs and the classifier, fractions of the full
net's), test accuracy, cumulative training FLOPs of the search relative to full training (counted:
the expected FLOPs of the sampled net, the paper's accounting; executed: the compacted shapes
actually trained), and the wall-clock of the search vs full training, timed one after the other
in this process with ``os.getloadavg()`` recorded: total (compilations included: the search compiles
once per restructuring), train (total minus the seconds JAX spent tracing, lowering and compiling
inside each, :mod:`pae.train.compilation`), and steady (the mean epoch time without each segment's
first epoch, which holds its compilations, search over full). ``--compilation-cache DIR`` turns on
JAX's persistent compilation cache (programs compiled by an earlier seed or process are loaded).

    python experiments/grow_structured.py                       # ResNet-20 and a VGG on digits, 3 seeds
    python experiments/grow_structured.py --models resnet20 --seeds 0
    python experiments/grow_structured.py --models resnet20 --dataset mnist_subset   # 28x28: compute-bound
    python experiments/grow_structured.py --paper cifar-resnet56 # CIFAR-10 (needs the data prepared)
    python experiments/grow_structured.py --paper imagenet-resnet50 --seeds 0   # ImageNet (tfds, manual)

The default is reduced to run in minutes on 2 CPU cores: ``digits`` (8x8), ResNet-20 at widths
(8, 16, 32) and VGG ``vgg8s`` (16, 16, M, 32, 32, M, 64, 64), 16 epochs; ``resnet20w`` is ResNet-20
at its CIFAR widths (16, 32, 64), where XLA's CPU convolutions follow the FLOPs more closely
(``experiments/bench_widths.py``). ``--paper`` takes the
paper's networks: on CIFAR-10 ResNet-20/56 and VGG-16 (160 epochs, lr 0.1), and ResNet-50 on
ImageNet (``imagenet-resnet50``: bottleneck blocks, the gate layout of
:func:`pae.growth.structured.gate_spec` for bottlenecks, budget 0.5 for the paper's ~50%
inference-FLOPs savings; 90 epochs, batch 256, lr 0.1, weight decay 1e-4, the usual ResNet-50
protocol, with the search's step decays at 56/85 and 71/85 of the epochs; the paper's exact
ImageNet hyperparameters are unverified). ``bneck-t`` is a tiny bottleneck net (the ResNet-50
layout at base width 2, two stages) for quick checks on the embedded data. Writes
``runs/grow_structured/grow_structured_<model>_<name>.{json,png}`` (``--name``, default the
dataset; ``--out-dir`` elsewhere) and prints a table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from pae.core import Context, Transform
from pae.data import load_dataset
from pae.growth import extraction as pe, flops as pf, structured as ps
from pae.models import VGG, CifarResNet, ResNet
from pae.models.slim import SlimBottleneckResNet, SlimVGG
from pae.train import Phase, evaluate, host, init_state, make_task, train_phases
from pae.train.cli import fill_unset
from pae.train.compilation import compile_clock, enable_compilation_cache
from pae.train.metrics import atomic_write

METHODS = ("full", "grown", "uniform", "slimming", "scratch")
DEFAULT_METHODS = ("full", "grown", "uniform", "slimming")  # "scratch" is an opt-in control

#: the reduced default nets: name -> (num_classes -> model)
MODELS = {
    "resnet20": lambda n: CifarResNet(20, n, (8, 16, 32)),
    "resnet20w": lambda n: CifarResNet(20, n),                # CIFAR widths (16, 32, 64)
    "vgg8s": lambda n: SlimVGG((16, 16, "M", 32, 32, "M", 64, 64), n),
    "resnet8t": lambda n: CifarResNet(8, n, (4, 8, 8)),    # tiny, for quick checks
    "vgg3t": lambda n: SlimVGG((8, "M", 16, 16), n),          # tiny, for the CI test
    # tiny bottleneck ResNet (ResNet-50 layout, base width 2, stages of 2 and 1 blocks): quick checks
    "bneck-t": lambda n: SlimBottleneckResNet.resnet((2, 1), 2, n),
}
#: ``--paper`` presets (CIFAR-10 at the paper's sizes; training settings of the CS protocol)
PAPER_MODELS = {
    "cifar-resnet20": lambda n: CifarResNet(20, n),
    "cifar-resnet56": lambda n: CifarResNet(56, n),
    "cifar-vgg16": lambda n: VGG(16, n),
    "imagenet-resnet50": lambda n: ResNet((3, 4, 6, 3), True, n),
}
PAPER_FLAGS = dict(dataset="cifar10", epochs=160, batch_size=128, lr=0.1, mask_lr=0.1,
                   weight_decay=1e-4, beta_final=200.0, lmbda=5.0, slim_finetune=40,
                   restructure_at=[0, 10, 20, 40, 80], margin=[0.25, 0.25, 0.25, 0.25, 0.0])
#: per-preset overrides of PAPER_FLAGS (ImageNet: the usual ResNet-50 protocol; unverified for the paper)
PAPER_PRESET_FLAGS = {
    "imagenet-resnet50": dict(dataset="imagenet2012", epochs=90, batch_size=256, lr=0.1, mask_lr=0.1,
                              weight_decay=1e-4, beta_final=200.0, lmbda=5.0, budget=0.5,
                              slim_finetune=20, restructure_at=[0, 5, 10, 20, 40],
                              margin=[0.25, 0.25, 0.25, 0.25, 0.0]),
}
UNSUPPORTED: dict[str, str] = {}

DEFAULTS = dict(models=["resnet20", "vgg8s"], dataset="digits", epochs=16, batch_size=128, lr=0.05,
                mask_lr=1.0, weight_decay=1e-4, beta_final=10.0, lmbda=30.0, budget=0.5,
                margin=[0.25, 0.25, 0.0], restructure_at=[0, 3, 6], penalize="count", slim_l1=1e-4,
                slim_finetune=5, methods=list(DEFAULT_METHODS))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: resnet20 vgg8s")
    p.add_argument("--dataset", help="default digits")
    p.add_argument("--epochs", type=int, help="every method's epochs (default 16)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="weights' lr (default 0.05)")
    p.add_argument("--mask-lr", type=float, help="mask logits' lr (default 1.0)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--beta-final", type=float, help="final temperature (default 10)")
    p.add_argument("--lmbda", type=float, help="lambda_base of the budget-aware penalty (default 30)")
    p.add_argument("--budget", type=float, help="inference-FLOPs budget in (0, 1] (default 0.5)")
    p.add_argument("--penalize", choices=ps.PENALTIES,
                   help="what lambda_t multiplies: the indicators' unweighted L1 ('count', CSQ's form; "
                        "default) or the expected FLOPs ('cost')")
    p.add_argument("--margin", type=float, nargs="+",
                   help="growth margin of each restructuring, or one for all (default 0.25 0.25 0: "
                        "grow, grow, then settle on the active channels; 0.25 with --restructure-at)")
    p.add_argument("--restructure-at", type=int, nargs="*",
                   help="epochs at which the search is restructured (default 0 3 6); none: masked "
                        "full-size training")
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   help=f"the methods to run (default: {' '.join(DEFAULT_METHODS)}); 'grown' is timed "
                        f"against 'full' when both run; 'scratch' (with 'grown') trains the grown net's "
                        f"architecture from a fresh initialization for the same epochs, the control of "
                        f"Liu et al. 2019 (does the search's training or its architecture set the accuracy?)")
    p.add_argument("--slim-l1", type=float, help="network slimming's L1 on BN scales (default 1e-4)")
    p.add_argument("--slim-finetune", type=int, help="network slimming's fine-tuning epochs (default 5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--limit-train", type=int, default=0,
                   help="use only the first N training examples (0: all; for quick checks)")
    p.add_argument("--paper", choices=sorted(PAPER_MODELS) + sorted(UNSUPPORTED),
                   help="the paper's networks: CIFAR-10 ResNet-20/56 and VGG-16, ImageNet ResNet-50 "
                        "(bottleneck blocks; needs imagenet2012 prepared for tfds)")
    p.add_argument("--compilation-cache", default="", metavar="DIR",
                   help="directory of JAX's persistent compilation cache (default '': off, every "
                        "program compiled in this process)")
    p.add_argument("--name", default="",
                   help="file name part after the model (default the dataset): "
                        "grow_structured_<model>_<name>.{json,png}")
    p.add_argument("--out-dir", default=os.path.join("runs", "grow_structured"),
                   help="default runs/grow_structured (the recorded results: --out-dir "
                        "experiments/results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", metavar="JSON",
                   help="only redraw the figure of a saved result (its .png beside it) and print its table")
    return p


def resolve(args):
    if args.paper in UNSUPPORTED:
        raise ValueError(f"--paper {args.paper}: {UNSUPPORTED[args.paper]}")
    out = fill_unset(args, DEFAULTS, PAPER_FLAGS if args.paper else {}, PAPER_PRESET_FLAGS.get(args.paper, {}),
                     {"models": [args.paper]} if args.paper else {},
                     # the default margins go with the default restructurings
                     {"margin": [0.25]} if args.restructure_at is not None else {})
    if not 0 < out.budget <= 1:
        raise ValueError(f"--budget must be in (0, 1], got {out.budget}")
    if out.epochs < 2:
        raise ValueError(f"--epochs must be >= 2, got {out.epochs}")
    if not 0 < out.slim_finetune < out.epochs:
        raise ValueError(f"--slim-finetune must be in [1, epochs), got {out.slim_finetune}")
    if any(not 0 <= e < out.epochs for e in out.restructure_at):
        given = "" if args.restructure_at is not None else " (the default; set --restructure-at for fewer epochs)"
        raise ValueError(f"--restructure-at epochs must be in [0, --epochs={out.epochs}), got "
                         f"{out.restructure_at}{given}")
    if len(set(out.restructure_at)) != len(out.restructure_at):
        raise ValueError(f"--restructure-at epochs must be distinct, got {out.restructure_at}")
    if any(not 0 <= m <= 1 for m in out.margin):
        raise ValueError(f"--margin values must be in [0, 1], got {out.margin}")
    if len(out.margin) == 1 or not out.restructure_at:
        out.margin = out.margin[:1] * len(out.restructure_at)
    elif len(out.margin) != len(out.restructure_at):
        raise ValueError(f"--margin: give one value or one per --restructure-at epoch "
                         f"({len(out.restructure_at)}), got {len(out.margin)}")
    pairs = sorted(zip(out.restructure_at, out.margin))      # in epoch order, each with its margin
    out.restructure_at, out.margin = [e for e, _ in pairs], [m for _, m in pairs]
    if 0 in out.margin and any(out.margin[out.margin.index(0):]):
        raise ValueError(f"--margin: a growth margin after the settling restructuring (margin 0) would "
                         f"regrow the settled net; settle last, got {pairs} as (epoch, margin)")
    out.methods = [m for m in METHODS if m in out.methods]
    if "scratch" in out.methods and "grown" not in out.methods:
        raise ValueError("--methods scratch trains the grown net's architecture: add 'grown'")
    return out


def _model(args, name, n):
    return (PAPER_MODELS if args.paper else MODELS)[name](n)


# ----------------------------------------------------------------------------- pieces

def dense_optimizer(cfg: ps.StructuredConfig, epochs: int, lr: float | None = None):
    """The search's weights' optimizer for plain parameters: L2, Nesterov SGD, step decays."""
    lr = cfg.lr if lr is None else lr

    def make(spe):
        bounds = {round(epochs * f) * spe: cfg.lr_decay for f in (56 / 85, 71 / 85)
                  if 0 < round(epochs * f) < epochs}
        sgd = optax.sgd(optax.piecewise_constant_schedule(lr, bounds), cfg.momentum, nesterov=True)
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay), sgd) if cfg.weight_decay else sgd
    return make


def bn_l1(strength: float) -> Transform:
    """Network slimming's penalty: ``strength * sum |BatchNorm scale|`` (params unchanged)."""
    def penalty(params, ctx):
        del ctx
        flat = traverse_util.flatten_dict(params)
        total = jnp.zeros((), jnp.float32)
        for k, v in flat.items():
            if k[-1] == "scale" and any(part.startswith("BatchNorm") for part in k):
                total = total + jnp.sum(jnp.abs(v))
        return jnp.float32(strength) * total
    return Transform(lambda p, k: p, lambda p, c: p, penalty, lambda p, c: p)


def _flops(model, example) -> float:
    return pf.full_cost(ps.gate_spec(model, example))


def width_flops(spec: ps.GateSpec, widths: dict[str, int]) -> float:
    """Inference FLOPs (multiply-accumulates per example) of ``spec``'s net with ``widths[group]``
    channels per group, all blocks on: ``sum over layers taps * C_in * C_out`` with a group's
    ``C`` its width. The count of :func:`pae.growth.flops.cost` for prefix masks, in host floats:
    :func:`uniform_nearest` evaluates it for hundreds of candidates, where ``cost``'s per-layer jnp
    dispatch takes seconds."""
    size = spec.group_sizes

    def c(group, n):
        return n if group is None else widths.get(group, size[group])
    return float(sum(layer.taps * c(layer.in_group, layer.in_size) * c(layer.out_group, layer.out_size)
                     for layer in spec.layers))


def uniform_candidates(spec: ps.GateSpec):
    """Every uniform thinning of the net: ``{original width n:
    w(n)}`` with ``|w(n) - r n| < 1`` for every original width ``n`` of the net's groups (each width
    ``r n`` rounded down or up, at least 1; groups of equal original width equally wide).

    Between consecutive breakpoints ``k / n`` the floors ``floor(r n)`` are constant and every
    ``r n`` is fractional, so each interval gives the ``2^(distinct widths)`` roundings."""
    sizes = sorted({n for _, n in spec.groups})
    breaks = sorted({0.0, 1.0} | {k / n for n in sizes for k in range(1, n)})
    out = set()
    for a, b in zip(breaks, breaks[1:]):
        r = (a + b) / 2
        floors = [math.floor(r * n) for n in sizes]
        for up in itertools.product((0, 1), repeat=len(sizes)):
            out.add(tuple(max(1, min(n, f + u)) for n, f, u in zip(sizes, floors, up)))
    return [dict(zip(sizes, w)) for w in sorted(out)]


def uniform_nearest(spec: ps.GateSpec, target: float):
    """The uniform thinning (:func:`uniform_candidates`) whose inference-FLOPs fraction is nearest
    ``target`` (ties: the smaller), over all of them. Returns ``(model, widths per group,
    FLOPs fraction)``. Rounding every width the same way (``round(r n)``) moves the FLOPs in steps
    of several percent on narrow nets (ResNet-20 at (8, 16, 32): 0.444 then 0.53); rounding each
    original width down or up independently fills those steps."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    full = pf.full_cost(spec)
    best = None
    for widths in uniform_candidates(spec):
        per_group = {g: widths[n] for g, n in spec.groups}
        f = width_flops(spec, per_group) / full
        key = (abs(f - target), f)
        if best is None or key < best[0]:
            best = (key, per_group, f)
    _, per_group, f = best
    return pe.slim_model(spec, per_group), per_group, f


def slimming_masks(spec: ps.GateSpec, params, target: float) -> dict[str, np.ndarray]:
    """``{group: bool mask}``: a global threshold on the channel scores (mean ``|gamma|`` over the
    BatchNorms writing the group), the lowest that keeps the FLOPs fraction <= ``target``; every
    group keeps at least its best channel."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    scores = {}
    for g, n in spec.groups:
        norms = [layer.norm for layer in spec.writers(g) if layer.norm is not None]
        scores[g] = np.mean([np.abs(flat[tuple(m.split("/")) + ("scale",)]) for m in norms], axis=0)
    full = pf.full_cost(spec)

    def masks(t):
        out = {}
        for g, s in scores.items():
            m = s > t
            m[np.argmax(s)] = True
            out[g] = m
        return out

    def frac(t):
        return float(pf.cost(spec, {g: m.astype(np.float32) for g, m in masks(t).items()}, {})) / full

    values = np.sort(np.concatenate(list(scores.values())))
    lo, hi = -1, len(values) - 1      # frac(values[hi]) <= target always (one channel a group)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if frac(values[mid]) <= target:
            hi = mid
        else:
            lo = mid
    return masks(values[hi])


def at_capacity(learned: dict, restructurings: list, sizes: dict, margins=None) -> list[str]:
    """Groups whose learned width is the width of the last growing restructuring (``margins``: one
    per restructuring, default all > 0; a settling one, margin 0, only cuts to the active
    channels), below the group's full size: the compacted net had no room left for them to grow
    (after ``k`` growing restructurings a group has at most its seed width plus ``k`` margins), so
    their width was capped, not learned."""
    growing = [w for i, (_, w) in enumerate(restructurings) if margins is None or margins[i] > 0]
    last = dict(growing[-1]) if growing else {}
    return sorted(g for g, n in learned.items() if g in last and n >= last[g] < sizes[g])


def _acc(task, state, model, batch_size):
    phase = Phase("eval", 0, lambda spe: optax.identity(), model=model)
    return float(evaluate(task, state, batch_size=batch_size, phase=phase)["test_acc"])


def _with_variables(model, example, variables, seed):
    state = init_state(model, example, seed)
    return state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}))


def _steady(history, key):
    """Epoch times without each segment's (phase's) first epoch, which holds its compilations."""
    out, seen = [], set()
    for r in history:
        seg = r.get(key, r["phase"])
        if seg in seen:
            out.append(r["epoch_time"])
        seen.add(seg)
    return out


# ----------------------------------------------------------------------------- one seed

def run_seed(args, name: str, dataset, seed: int, log=print) -> dict:
    n_classes = dataset.num_classes
    model = _model(args, name, n_classes)
    task = make_task(model, dataset, eval_splits=("test",))
    example = np.asarray(dataset.example_inputs())
    spec = ps.gate_spec(model, example)
    full_flops, full_params = pf.full_cost(spec), pf.full_cost(spec, "params")
    cfg = ps.StructuredConfig(epochs=args.epochs, lr=args.lr, mask_lr=args.mask_lr,
                              weight_decay=args.weight_decay, beta_final=args.beta_final,
                              lmbda=args.lmbda, budget=args.budget, penalize=args.penalize, seed=seed)
    bs, E = args.batch_size, args.epochs
    rows, out = [], {"seed": seed}
    quiet = lambda s: None  # noqa: E731
    clock = compile_clock()

    def timed(fn):
        """``(result, wall seconds, compile seconds, load average after)``: compile is JAX's tracing,
        lowering and compilation inside ``fn`` (pae.train.compilation); train = wall - compile."""
        c0, t0 = clock.seconds, time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0, clock.seconds - c0, os.getloadavg()

    def row(method, net, acc, **extra):
        return {"method": method, "flops": _flops(net, example) / full_flops, "test_acc": acc, "epochs": E,
                "params": pf.full_cost(ps.gate_spec(net, example), "params") / full_params, **extra}

    # full training and the search, timed one after the other
    load0 = os.getloadavg()
    if "full" in args.methods:
        full, t_full, c_full, load1 = timed(lambda: train_phases(
            task, [Phase("full", E, dense_optimizer(cfg, E))], init_state(model, example, seed),
            batch_size=bs, seed=seed, log=quiet))
        rows.append(row("full", model, full.history[-1]["test_acc"]))
        log(f"[{name} seed {seed}] full {rows[-1]['test_acc']:.4f} ({t_full:.1f} s, compile {c_full:.1f} s)")
    target = args.budget
    if "grown" in args.methods:
        state = init_state(model, example, seed, cfg.transform(spec).init)
        search, t_search, c_search, load2 = timed(lambda: ps.structured_search(
            task, cfg, spec, state, batch_size=bs, restructure_at=args.restructure_at, margin=args.margin,
            log=quiet))
        if "full" in args.methods:
            s_full, s_search = _steady(full.history, "phase"), _steady(search.history, "segment")
            out["timing"] = {"full_s": t_full, "search_s": t_search, "ratio": t_search / t_full,
                             "full_compile_s": c_full, "search_compile_s": c_search,
                             "ratio_train": (t_search - c_search) / (t_full - c_full),
                             "full_epoch_times": [r["epoch_time"] for r in full.history],
                             "search_epoch_times": [r["epoch_time"] for r in search.history],
                             "ratio_steady": float(np.mean(s_search) / np.mean(s_full)) if s_full and s_search
                             else float("nan"),
                             "loadavg": [list(load0), list(load1), list(load2)]}

        # extraction: logits equal the gated (evaluation) logits
        current, st = search.spec, search.state
        ex = pe.extract(current, st.params, st.batch_stats)
        test = dataset["test"]
        first = test.take(np.arange(min(256, len(test))))          # any source (arrays or tfds records)
        eval_tf = dataset.transform(False)
        x_test = np.asarray((eval_tf(first, np.random.default_rng(0)) if eval_tf else first)["inputs"],
                            np.float32)
        t = cfg.transform(current, reference=spec)
        gated = current.model.apply({"params": t.apply(st.params, Context.make(beta=cfg.beta_final, train=False)),
                                     "batch_stats": st.batch_stats}, x_test)
        extracted = ex.model.apply(ex.variables, x_test)
        grown_acc = _acc(task, _with_variables(ex.model, example, ex.variables, seed), ex.model, bs)
        hist = search.history
        learned = {g: int(len(ex.kept[g])) for g in ex.kept}
        out["search"] = {
            "history": [{k: r[k] for k in ("epoch", "segment", "flops", "params", "train_flops", "width_flops",
                                           "channels", "blocks", "lambda", "train_loss", "test_acc",
                                           "epoch_time") if k in r} for r in hist],
            "widths": [[e, w] for e, w in search.widths],
            "seed_flops": float(pf.cost(spec, *ps.hard_gates(state.params.logits)) / full_flops),
            "learned_widths": learned,
            "original_widths": spec.group_sizes,
            "at_capacity": at_capacity(learned, search.widths, spec.group_sizes, args.margin),
            "blocks_on": list(ex.blocks), "gated_blocks": [b.name for b in spec.blocks],
            "total_channels": int(sum(spec.group_sizes.values())),
            "extract_max_abs_diff": float(np.max(np.abs(np.asarray(extracted) - np.asarray(gated)))),
            "gated_acc_last_epoch": hist[-1]["test_acc"],
            "train_flops_counted": float(np.mean([r["train_flops"] for r in hist])),
            "train_flops_executed": float(np.mean([r["width_flops"] for r in hist])),
        }
        rows.append(row("grown", ex.model, grown_acc))
        target = rows[-1]["flops"]
        log(f"[{name} seed {seed}] grown {grown_acc:.4f} at {target:.3f} FLOPs (extracted - gated logits "
            f"{out['search']['extract_max_abs_diff']:.1e}); search {t_search:.1f} s (compile {c_search:.1f} s)"
            + (f"; at the compacted net's capacity: {', '.join(out['search']['at_capacity'])}"
               if out["search"]["at_capacity"] else ""))

    # the baselines at the grown net's FLOPs (the budget when the search is not run)
    if "uniform" in args.methods:     # uniform thinning (the nearest of all uniform roundings)
        thin, thin_widths, _ = uniform_nearest(spec, target)
        u = train_phases(task, [Phase("uniform", E, dense_optimizer(cfg, E), model=thin)],
                         init_state(thin, example, seed), batch_size=bs, seed=seed, log=quiet)
        rows.append(row("uniform", thin, u.history[-1]["test_acc"], widths=thin_widths))
        log(f"[{name} seed {seed}] uniform {rows[-1]['test_acc']:.4f} at {rows[-1]['flops']:.3f}")

    if "scratch" in args.methods:     # the grown architecture from a fresh initialization
        sc = train_phases(task, [Phase("scratch", E, dense_optimizer(cfg, E), model=ex.model)],
                          init_state(ex.model, example, seed), batch_size=bs, seed=seed, log=quiet)
        rows.append(row("scratch", ex.model, sc.history[-1]["test_acc"]))
        log(f"[{name} seed {seed}] scratch {rows[-1]['test_acc']:.4f} at {rows[-1]['flops']:.3f}")

    if "slimming" in args.methods:    # L1 on BN scales, prune to the grown net's FLOPs, fine-tune
        F = args.slim_finetune
        sparse = train_phases(task, [Phase("slim_train", E - F, dense_optimizer(cfg, E - F), bn_l1(args.slim_l1))],
                              init_state(model, example, seed), batch_size=bs, seed=seed, log=quiet)
        sp_state = host(sparse.state)
        group_masks = slimming_masks(spec, sp_state.params, target)
        layer_masks = {layer.path: group_masks[layer.out_group] for layer in spec.layers if layer.out_group}
        pruned = pe.extract_masked(spec, sp_state.params, sp_state.batch_stats, layer_masks)
        pstate = _with_variables(pruned.model, example, pruned.variables, seed)
        acc_pruned = _acc(task, pstate, pruned.model, bs)
        ft = train_phases(task, [Phase("slim_finetune", F, dense_optimizer(cfg, F, cfg.lr * 0.1),
                                       model=pruned.model, data_epochs_from=E - F)],
                          pstate, batch_size=bs, seed=seed, log=quiet)
        rows.append(row("slimming", pruned.model, ft.history[-1]["test_acc"], test_acc_pruned=acc_pruned))
        log(f"[{name} seed {seed}] slimming {rows[-1]['test_acc']:.4f} at {rows[-1]['flops']:.3f} "
            f"(before fine-tuning {acc_pruned:.4f})")
    out["rows"] = [{"seed": seed, **r} for r in rows]
    return out


# ----------------------------------------------------------------------------- summary

def summarize(rows):
    out = []
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        a, f = np.array([r["test_acc"] for r in rs]), np.array([r["flops"] for r in rs])
        sd = lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
        out.append({"method": m, "n": len(rs), "test_acc": float(a.mean()), "test_acc_std": sd(a),
                    "flops": float(f.mean()), "flops_std": sd(f), "epochs": rs[0]["epochs"],
                    "params": float(np.mean([r["params"] for r in rs]))})
    return out


def targets(per_seed, summary, budget):
    """The issue's targets that the methods run can tell (all of them when every method ran)."""
    by = {r["method"]: r for r in summary}
    out = {"seeds": len(per_seed)}
    if "grown" not in by:
        return out
    out["grown_flops_le_budget"] = bool(max(r["flops"] for s in per_seed for r in s["rows"]
                                            if r["method"] == "grown") <= budget + 1e-9)
    out["grown_flops"] = by["grown"]["flops"]
    if "full" in by:
        out["grown_within_1pt_of_full"] = by["grown"]["test_acc"] >= by["full"]["test_acc"] - 0.01
    for peer in ("uniform", "slimming", "scratch"):
        if peer in by:
            out[f"grown_above_{peer}"] = by["grown"]["test_acc"] > by[peer]["test_acc"]
            out[f"{peer}_flops"] = by[peer]["flops"]
    for kind in ("counted", "executed"):
        v = float(np.mean([s["search"][f"train_flops_{kind}"] for s in per_seed]))
        out[f"train_flops_{kind}"], out[f"train_flops_{kind}_le_0.6"] = v, v <= 0.6
    if all("timing" in s for s in per_seed):
        for field, name, met in (("ratio", "wallclock_ratio", "wallclock_le_0.75"),
                                 ("ratio_steady", "wallclock_ratio_steady", "wallclock_steady_le_0.75"),
                                 ("ratio_train", "wallclock_ratio_train", "wallclock_train_le_0.75")):
            v = float(np.mean([s["timing"][field] for s in per_seed]))
            out[name], out[met] = v, v <= 0.75
    out["extract_max_abs_diff"] = float(max(s["search"]["extract_max_abs_diff"] for s in per_seed))
    return out


def table(summary) -> str:
    lines = [f"{'method':<10}{'FLOPs':>14}{'params':>9}{'test acc':>18}{'epochs':>8}"]
    for r in summary:
        acc = f"{100 * r['test_acc']:.2f}" + (f" ±{100 * r['test_acc_std']:.2f}" if r["n"] > 1 else "")
        fl = f"{r['flops']:.3f}" + (f" ±{r['flops_std']:.3f}" if r["n"] > 1 else "")
        lines.append(f"{r['method']:<10}{fl:>14}{r['params']:>9.3f}{acc:>18}{r['epochs']:>8}")
    return "\n".join(lines)


def plot(result, path, title):
    from matplotlib.figure import Figure

    per_seed, summary = result["per_seed"], result["summary"]
    fig = Figure(figsize=(17, 4.2))
    ax = fig.subplots(1, 4)
    for i, s in enumerate(per_seed):
        h = s["search"]["history"]
        ep = [0] + [r["epoch"] for r in h]
        kw = dict(alpha=1.0 if i == 0 else 0.45, lw=1.5 if i == 0 else 1)
        lab = (lambda t: t) if i == 0 else (lambda t: None)
        ax[0].plot(ep, [s["search"]["seed_flops"]] + [r["flops"] for r in h], "C0-", label=lab("active (evaluated architecture)"), **kw)
        ax[0].step(ep, [h[0]["width_flops"]] + [r["width_flops"] for r in h], "C1-", where="pre",
                   label=lab("executed (compacted net trained)"), **kw)
        ax[0].plot(ep[1:], [r["train_flops"] for r in h], "C2--", label=lab("counted (sampled net)"), **kw)
        total = s["search"]["total_channels"]
        ax[1].plot(ep[1:], [r["channels"] / total for r in h], "C0-", label=lab("active channels"), **kw)
        if s["search"]["gated_blocks"]:
            ax[1].plot(ep[1:], [r["blocks"] / len(s["search"]["gated_blocks"]) for r in h], "C3-",
                       label=lab("active gated blocks"), **kw)
    b = result["config"]["budget"]
    ax[0].axhline(b, color="k", ls=":", lw=1, label=f"budget {b}")
    ax[0].set(title="FLOPs over the search (fraction of the full net)", xlabel="epoch", ylim=(0, 1.02))
    ax[1].set(title="active channels / blocks (fraction)", xlabel="epoch", ylim=(0, 1.02))
    s0 = per_seed[0]["search"]
    names = list(s0["original_widths"])
    x = np.arange(len(names))
    learned = np.array([[s["search"]["learned_widths"][g] for g in names] for s in per_seed], float)
    ax[2].bar(x - 0.2, [s0["original_widths"][g] for g in names], 0.4, label="original", color="C7")
    ax[2].bar(x + 0.2, learned.mean(0), 0.4, yerr=learned.std(0) if len(per_seed) > 1 else None,
              label=f"learned (mean of {len(per_seed)} seeds)", color="C0")
    ax[2].set_xticks(x, [g.replace("BasicBlock_", "B").replace("Bottleneck_", "K").replace("/Conv_0", "in")
                         .replace("/Conv_1", "mid").replace("stream", "s")
                         .replace("Conv_", "c") for g in names], rotation=60, fontsize=7)
    ax[2].set(title="widths per channel group", ylabel="channels")
    styles = {"full": "ks", "grown": "C0o", "uniform": "C1^", "slimming": "C2D", "scratch": "C4v"}
    for m, st in styles.items():
        rs = [r for s in per_seed for r in s["rows"] if r["method"] == m]
        if not rs:
            continue
        ax[3].plot([100 * r["flops"] for r in rs], [100 * r["test_acc"] for r in rs], st, alpha=0.3, ms=4)
        r = next(r for r in summary if r["method"] == m)
        ax[3].errorbar(100 * r["flops"], 100 * r["test_acc"], yerr=100 * r["test_acc_std"],
                       xerr=100 * r["flops_std"], fmt=st, ms=8, capsize=3, label=m)
    ax[3].set(title="test accuracy vs inference FLOPs", xlabel="inference FLOPs (% of full)",
              ylabel="test accuracy (%)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_model(args, name, dataset, log=print) -> dict:
    load = list(os.getloadavg())
    per_seed = [run_seed(args, name, dataset, seed, log) for seed in args.seeds]
    rows = [r for s in per_seed for r in s["rows"]]
    summary = summarize(rows)
    config = {k: v for k, v in vars(args).items() if k not in ("out_dir", "no_plot", "models", "traceback")}
    config["loadavg_start"], config["loadavg_end"] = load, list(os.getloadavg())
    return {"model": name, "config": config, "per_seed": per_seed, "rows": rows, "summary": summary,
            "targets": targets(per_seed, summary, args.budget)}


def main(argv=None) -> dict:
    from pae.train.cli import one_line_errors

    args = one_line_errors(build_parser()).parse_args(argv)
    if args.replot:
        if not os.path.exists(args.replot):
            raise FileNotFoundError(f"--replot: no such file {args.replot!r}")
        with open(args.replot) as f:
            result = json.load(f)
        cfg = result["config"]
        plot(result, os.path.splitext(args.replot)[0] + ".png",
             f"{result['model']} on {cfg['dataset']}: grown (budget {cfg['budget']}) vs full, uniform, "
             f"slimming ({len(cfg['seeds'])} seeds, {cfg['epochs']} epochs)")
        print(table(result["summary"]))
        return {result["model"]: result}
    args = resolve(args)
    enable_compilation_cache(args.compilation_cache)
    dataset = load_dataset(args.dataset)
    if args.limit_train:
        train = dataset["train"]
        small = train.subset(np.arange(min(args.limit_train, len(train))))   # arrays or tfds records
        import dataclasses
        dataset = dataclasses.replace(dataset, splits={**dataset.splits, "train": small})
    os.makedirs(args.out_dir, exist_ok=True)
    results = {}
    for name in args.models:
        result = run_model(args, name, dataset)
        base = os.path.join(args.out_dir, f"grow_structured_{name}_{args.name or args.dataset}")
        atomic_write(base + ".json", json.dumps(result, indent=1, default=float))
        drawn = not args.no_plot and "grown" in args.methods     # the figure shows the search
        if drawn:
            plot(result, base + ".png", f"{name} on {args.dataset}: grown (budget {args.budget}) vs "
                                        f"{', '.join(m for m in args.methods if m != 'grown')} "
                                        f"({len(args.seeds)} seeds, {args.epochs} epochs)")
        print(f"== {name} on {args.dataset} ({len(args.seeds)} seeds, {args.epochs} epochs)")
        print(table(result["summary"]))
        tg = result["targets"]
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in tg.items()}))
        if all("timing" in s for s in result["per_seed"]):
            loads = [s["timing"]["loadavg"] for s in result["per_seed"]]
            print("wall-clock search/full per seed: " + ", ".join(
                f"{s['timing']['search_s']:.1f}/{s['timing']['full_s']:.1f} s (compile "
                f"{s['timing']['search_compile_s']:.1f}/{s['timing']['full_compile_s']:.1f} s)"
                for s in result["per_seed"])
                  + f"; load average (1 min) at the timings: {[[round(l[0], 2) for l in x] for x in loads]}")
        print(f"wrote {base}.json" + (f" and {base}.png" if drawn else ""))
        results[name] = result
    return results


if __name__ == "__main__":
    from pae.train.cli import run_script

    run_script(main, sys.argv[1:])
