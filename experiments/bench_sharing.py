"""Soft sharing speed: SWRN vs WRN train step, and compile time of the folded (scan) vs unrolled net.

1. Train-step time of SWRN-L-w-k (the template-bank transform rebuilds every shared kernel
   ``W_i = sum_j alpha_ij T_j`` inside the step) against the unshared WRN-L-w of the same shape,
   both made by :func:`pae.train.step.make_train_step` (the engine's step) with the sharing recipe's
   optimizer, timed *interleaved* in one process (step A, step B, A, B, ...) so that load changes hit
   both; the ratio is the median of the per-pair ratios. Target: <= 1.15.
2. Compile time (``jit(...).lower(...).compile()``) of the train step of a
   :class:`pae.models.swrn.LoopedWideResNet` (every stage's shared blocks one ``nn.scan`` loop, the
   folded SWRN) against the unrolled :class:`pae.models.WideResNet` of the same depth, for each of
   ``--compile-depths``: ratio unrolled / folded (> 1: the loop compiles faster); each net is
   compiled ``--compile-repeats`` times, alternating with the other, from a fresh step function
   (no compilation cache hit), and the minimum is kept.

``os.getloadavg()`` is recorded before and after (the machines are shared; ratios, not absolute
times, are the result).

    python experiments/bench_sharing.py                  # WRN-28-1 vs SWRN-28-1-2, 32x32x3, batch 32

Writes ``runs/bench_sharing/bench_sharing.json`` (``--out`` elsewhere) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pae import sharing as sh
from pae.core import Context
from pae.models import WideResNet
from pae.models.swrn import LoopedWideResNet
from pae.train.metrics import atomic_write
from pae.train.state import TrainState
from pae.train.step import make_train_step


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--widen", type=int, default=1)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--image", type=int, default=32, help="input height = width (3 channels)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per net (after 2 warm-up steps)")
    p.add_argument("--compile-depths", type=int, nargs="*", default=[28, 52, 100])
    p.add_argument("--compile-repeats", type=int, default=2,
                   help="compilations per net and depth, alternating; the minimum is reported")
    p.add_argument("--out", default=os.path.join("runs", "bench_sharing", "bench_sharing.json"),
                   help="the JSON record (default under runs/; the recorded one was written to "
                        "experiments/results/sharing_bench.json)")
    return p


def _state(params, batch_stats, tx):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), key=jax.random.PRNGKey(0))


def step_ratio(args) -> dict:
    cfg = sh.swrn(args.depth, args.widen, args.k)
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.normal(size=(args.batch_size, args.image, args.image, 3)), jnp.float32),
             "targets": jnp.asarray(rng.integers(0, 10, args.batch_size), jnp.int32),
             "mask": jnp.ones((args.batch_size,), jnp.float32)}
    variables = cfg.model.init(jax.random.PRNGKey(0), batch["inputs"][:1])
    tx = sh.sharing_optimizer(sh.SharingConfig(epochs=10), steps_per_epoch=10)
    t = cfg.transform
    latent = t.init(variables["params"], jax.random.PRNGKey(1))
    steps = {
        "WRN": (make_train_step(cfg.model, tx, donate=False, pass_mask=True),
                _state(variables["params"], variables["batch_stats"], tx)),
        "SWRN": (make_train_step(cfg.model, tx, reparam=t.apply, penalty=t.penalty, donate=False,
                                 pass_mask=True),
                 _state(latent, variables["batch_stats"], tx)),
    }
    ctx = Context.make()
    states = {}
    for name, (fn, state) in steps.items():
        for _ in range(2):
            state, m = fn(state, batch, ctx)
        jax.block_until_ready(state.params)
        states[name] = state
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, (fn, _) in steps.items():
            began = time.perf_counter()
            states[name], m = fn(states[name], batch, ctx)
            jax.block_until_ready(states[name].params)
            times[name].append(time.perf_counter() - began)
    ratios = np.asarray(times["SWRN"]) / np.asarray(times["WRN"])
    return {"net": f"{cfg.name} vs WRN-{args.depth}-{args.widen}", "batch": args.batch_size,
            "image": args.image, "wrn_ms": 1e3 * float(np.median(times["WRN"])),
            "swrn_ms": 1e3 * float(np.median(times["SWRN"])), "ratio": float(np.median(ratios)),
            "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
            "params_wrn": sh.num_parameters(variables["params"]), "params_swrn": sh.num_parameters(latent)}


def compile_ratio(depth, args) -> dict:
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.normal(size=(args.batch_size, args.image, args.image, 3)), jnp.float32),
             "targets": jnp.asarray(rng.integers(0, 10, args.batch_size), jnp.int32),
             "mask": jnp.ones((args.batch_size,), jnp.float32)}
    tx = sh.sharing_optimizer(sh.SharingConfig(epochs=10), steps_per_epoch=10)
    out = {"depth": depth}
    models = (("unrolled", WideResNet(depth, args.widen)), ("folded", LoopedWideResNet(depth, args.widen)))
    states = {}
    for name, model in models:
        v = model.init(jax.random.PRNGKey(0), batch["inputs"][:1])
        states[name] = _state(v["params"], v["batch_stats"], tx)
    times = {name: [] for name, _ in models}
    for _ in range(args.compile_repeats):        # alternating, a fresh step function each time
        for name, model in models:
            fn = make_train_step(model, tx, donate=False, pass_mask=True, jit=False)
            began = time.perf_counter()
            jax.jit(fn).lower(states[name], batch, Context.make()).compile()
            times[name].append(time.perf_counter() - began)
    for name in times:
        out[f"{name}_s"] = min(times[name])
        out[f"{name}_all_s"] = times[name]
    out["ratio"] = out["unrolled_s"] / out["folded_s"]
    return out


def main(argv=None) -> dict:
    from pae.train.cli import one_line_errors

    args = one_line_errors(build_parser()).parse_args(argv)
    for name in ("depth", "widen", "k", "image", "batch_size", "steps", "compile_repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    load_before = os.getloadavg()
    step = step_ratio(args)
    compiles = [compile_ratio(d, args) for d in args.compile_depths]
    result = {"train_step": step, "compile": compiles, "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count(),
              "backend": jax.default_backend(), "target_step_ratio": 1.15,
              "step_ratio_met": step["ratio"] <= 1.15}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2))
    print(f"train step  {step['net']}, batch {step['batch']} of {step['image']}x{step['image']}x3: "
          f"WRN {step['wrn_ms']:.1f} ms, SWRN {step['swrn_ms']:.1f} ms, ratio {step['ratio']:.3f} "
          f"(IQR {step['ratio_iqr'][0]:.3f}-{step['ratio_iqr'][1]:.3f}; target <= 1.15)")
    for c in compiles:
        print(f"compile     WRN-{c['depth']}-{args.widen} train step: unrolled {c['unrolled_s']:.2f} s, "
              f"folded (scan) {c['folded_s']:.2f} s, ratio {c['ratio']:.2f}x")
    print(f"load average before {load_before}, after {result['loadavg_after']} ({os.cpu_count()} CPUs)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    from pae.train.cli import run_script

    run_script(main, sys.argv[1:])
