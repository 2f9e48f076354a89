"""Jitted optimizer-update time on a ResNet-50 parameter pytree, as ratios to optax.adam.

    python experiments/bench_optimizers.py [--rounds 7] [--iters 5] \
        [--out experiments/results/optim_bench.json]   (default runs/bench/optim_bench.json)

The pytree is the real ``pae.models.get_model("resnet50", 1000)`` parameter tree (161 leaves,
25.6M float32 parameters; shapes from ``jax.eval_shape``, values random). Each optimizer's
``update(grads, state, params)`` is jitted, warmed up, then timed in interleaved rounds: every
round times ``--iters`` consecutive updates of every optimizer, one after the other, so the
optimizers share the machine's slow drifts. The ratio reported for an optimizer is the median over
rounds of (its round time / adam's round time in the same round). Two modes, each with its own
adam baseline: ``donated`` (the optimizer state is donated to the jitted update, as
``pae.train.make_train_step`` donates the train state) and ``fresh`` (no donation).
Target from issue 4: avagrad and adabound <= 1.3x adam.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pae.optim as po
from pae import models

OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-3),
    "avagrad": lambda: po.avagrad(0.1, eps=0.1),
    "avagrad(paper)": lambda: po.avagrad(0.1, eps=0.1, form="paper"),
    "avagradw": lambda: po.avagradw(0.1, eps=0.1, weight_decay=5e-4),
    "adabound": lambda: po.adabound(1e-3, final_lr=0.1),
    "amsbound": lambda: po.amsbound(1e-3, final_lr=0.1),
    "optax.amsgrad": lambda: optax.amsgrad(1e-3),  # the natural baseline for amsbound (3 moments)
    "csgd": lambda: po.csgd(0.1, momentum=0.9, weight_decay=5e-4),
    "sgd-momentum": lambda: optax.sgd(0.1, momentum=0.9),
}
MODES = ("donated", "fresh")


def resnet50_params(seed: int = 0):
    """ResNet-50 (ImageNet, 1000 classes) parameter pytree with random float32 values."""
    model = models.get_model("resnet50", 1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                               train=False))["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = [jax.random.normal(k, s.shape, jnp.float32) * 0.05 for k, s in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, values)


def make_step(tx, donate: bool):
    def step(grads, state, params):
        return tx.update(grads, state, params)

    return jax.jit(step, donate_argnums=(1,) if donate else ())


def time_mode(names, params, grads, donate: bool, rounds: int, iters: int) -> dict[str, list[float]]:
    """Seconds per update, one entry per round, for every optimizer (interleaved rounds)."""
    runners = {}
    for name in names:
        tx = OPTIMIZERS[name]()
        step = make_step(tx, donate)
        state = jax.jit(tx.init)(params)
        for _ in range(2):  # compile + warm-up
            updates, state = step(grads, state, params)
        jax.block_until_ready((updates, state))
        runners[name] = [step, state]
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            step, state = runners[name]
            began = time.perf_counter()
            for _ in range(iters):
                updates, state = step(grads, state, params)
            jax.block_until_ready((updates, state))
            times[name].append((time.perf_counter() - began) / iters)
            runners[name][1] = state
    del runners
    return times


def summarize(times: dict[str, list[float]]) -> dict[str, dict]:
    out = {}
    for name, ts in times.items():
        ratios = [t / a for t, a in zip(ts, times["adam"])]
        q25, q75 = np.percentile(ratios, [25, 75])
        out[name] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                     "ratio_vs_adam": statistics.median(ratios),
                     "ratio_q25": float(q25), "ratio_q75": float(q75)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5, help="updates per optimizer per round")
    parser.add_argument("--only", nargs="*", default=None, help="subset of optimizers (adam always)")
    parser.add_argument("--out", default="runs/bench/optim_bench.json")
    args = parser.parse_args()

    names = list(OPTIMIZERS) if not args.only else ["adam"] + [n for n in args.only if n != "adam"]
    params = resnet50_params()
    grads = jax.tree.map(lambda p: p * 0.1 + 0.01, params)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    results = {mode: summarize(time_mode(names, params, grads, mode == "donated", args.rounds,
                                         args.iters)) for mode in MODES}

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"optax {optax.__version__}, {os.cpu_count()} CPUs")
    print(f"pytree: resnet50, {len(jax.tree.leaves(params))} leaves, {n_params / 1e6:.2f}M float32 "
          f"params; {args.rounds} rounds x {args.iters} updates per mode")
    header = f"{'optimizer':<15}"
    for mode in MODES:
        header += f" | {mode + ' ms':>11} {'x adam':>7} {'IQR':>13}"
    print(header)
    rows = []
    for name in names:
        line = f"{name:<15}"
        row = {"optimizer": name}
        for mode in MODES:
            r = results[mode][name]
            row[mode] = r
            iqr = f"[{r['ratio_q25']:.2f}, {r['ratio_q75']:.2f}]"
            line += f" | {r['median_ms']:>11.1f} {r['ratio_vs_adam']:>7.3f} {iqr:>13}"
        rows.append(row)
        print(line)
    verdict = {f"{k} ({mode})": results[mode][k]["ratio_vs_adam"] <= 1.3
               for k in ("avagrad", "adabound") if k in names for mode in MODES}
    print("target <= 1.3x adam:", ", ".join(f"{k} {'met' if v else 'MISSED'}"
                                            for k, v in verdict.items()))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "jitted optimizer update, resnet50 pytree",
                   "command": "python experiments/bench_optimizers.py "
                              f"--rounds {args.rounds} --iters {args.iters}",
                   "device": device.device_kind, "backend": jax.default_backend(),
                   "jax": jax.__version__, "optax": optax.__version__,
                   "cpu_count": os.cpu_count(), "machine": platform.machine(),
                   "num_params": n_params, "num_leaves": len(jax.tree.leaves(params)),
                   "rounds": args.rounds, "iters": args.iters, "modes": list(MODES),
                   "rows": rows, "target_met": verdict}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
