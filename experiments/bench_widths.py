"""Train-step time against channel widths: does a thinner net train faster on this machine?

    python experiments/bench_widths.py [--depth 20] [--widths 16-32-64 8-16-32 ...] [--gated]
        [--batch 128] [--repeats 12] [--out runs/bench/bench_widths.json]

Structured growth (:mod:`pae.growth.structured`) and growth with variance transfer
(:mod:`pae.growth.vt`) train narrower nets to save time. Whether time follows FLOPs depends on the
backend: XLA's CPU convolutions are fastest at some channel counts and slow at others. This script
times one train step of a CIFAR ResNet (``SlimResNet``, 28x28x1 inputs, batch 128, SGD with
momentum) at each of ``--widths`` (stream widths of the three stages, every block at its stage's
width), side by side in one process: the steps alternate so that machine load hits all alike. The
first width is the reference; the table gives each width's FLOPs fraction (:mod:`pae.growth.flops`)
and its median step time as a fraction of the reference's. ``--gated``: also the step of the
structured-sparsification search on that net (sampled channel and block gates, the budget penalty,
mask-logit gradients: :func:`pae.growth.structured.structured_sparsification`), against the dense
step at the same widths. Writes JSON under ``runs/`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pae.core import Context, identity
from pae.growth import flops as pf
from pae.growth import structured as ps
from pae.models import CifarResNet
from pae.models.slim import SlimResNet
from pae.train import init_state, make_train_step

DEFAULT_WIDTHS = ["16-32-64", "8-16-32", "12-24-48", "11-23-45", "16-24-48", "16-32-48", "4-8-16",
                  "6-12-24"]


def parse_widths(text: str) -> tuple[int, int, int]:
    try:
        w = tuple(int(v) for v in text.split("-"))
    except ValueError:
        w = ()
    if len(w) != 3 or min(w) < 1:
        raise ValueError(f"--widths: each entry is three positive stage widths like 16-32-64, got {text!r}")
    return w


def slim_resnet(widths, depth: int, num_classes: int = 10) -> SlimResNet:
    """A CIFAR ResNet of ``depth`` (6n + 2) with stage widths ``widths``, every block inside at its stage's."""
    return SlimResNet.like(CifarResNet(depth, num_classes, tuple(widths)))


def bench(args) -> dict:
    rng = np.random.default_rng(0)
    shape = (args.batch, 28, 28, 1)
    data = {"inputs": jnp.asarray(rng.normal(size=shape), jnp.float32),
            "targets": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32),
            "mask": jnp.ones(args.batch, jnp.float32)}
    example = np.zeros((1, *shape[1:]), np.float32)
    widths = [parse_widths(w) for w in args.widths]
    reference = ps.gate_spec(slim_resnet(widths[0], args.depth), example)
    full_flops = pf.full_cost(reference)
    cfg = ps.StructuredConfig(epochs=16, lr=0.05, budget=0.5, lmbda=30.0)
    runs, rows = {}, []

    def add(key, model, tx, transform, ctx):
        step = make_train_step(model, tx, reparam=transform.apply, penalty=transform.penalty, pass_mask=True)
        state = init_state(model, example, 0, transform.init)
        state = state.replace(opt_state=tx.init(state.params))
        for _ in range(3):                  # compile and warm up
            state, _ = step(state, data, ctx)
        runs[key] = [step, jax.block_until_ready(state), ctx]

    for w in widths:
        model = slim_resnet(w, args.depth)
        spec = ps.gate_spec(model, example)
        rows.append({"widths": list(w), "flops": pf.full_cost(spec) / full_flops})
        add((w, "dense"), model, optax.sgd(0.05, momentum=0.9), identity(), Context.make())
        if args.gated:
            add((w, "gated"), model, ps.structured_optimizer(cfg, 32), cfg.transform(spec, reference=reference),
                Context.make(beta=2.0, key=jax.random.PRNGKey(0)))
    load_before = os.getloadavg()[0]
    times = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            step, state, ctx = run
            t0 = time.perf_counter()
            state, _ = step(state, data, ctx)
            run[1] = jax.block_until_ready(state)
            times[key].append(time.perf_counter() - t0)
    ref = statistics.median(times[(widths[0], "dense")])
    for row, w in zip(rows, widths):
        row["dense_ms"] = statistics.median(times[(w, "dense")]) * 1e3
        row["time"] = row["dense_ms"] / (ref * 1e3)
        if args.gated:
            row["gated_ms"] = statistics.median(times[(w, "gated")]) * 1e3
            row["gated_over_dense"] = row["gated_ms"] / row["dense_ms"]
    return {"rows": rows, "load_before": load_before, "load_after": os.getloadavg()[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20, help="6n + 2 (20: ResNet-20, 8: ResNet-8)")
    p.add_argument("--widths", nargs="+", default=DEFAULT_WIDTHS,
                   help="stage widths, the first the reference (default: %(default)s)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--gated", action="store_true", help="also time the structured search's gated step")
    p.add_argument("--out", default="runs/bench/bench_widths.json")
    args = p.parse_args(argv)
    if args.depth < 8 or (args.depth - 2) % 6:
        p.error(f"--depth must be 6n + 2 >= 8, got {args.depth}")
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    try:
        result = bench(args)
    except ValueError as err:
        p.error(str(err))
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{os.cpu_count()} cores; ResNet-{args.depth}, batch {args.batch}, 28x28x1")
    head = f"{'widths':<12}{'FLOPs':>7}{'step ms':>9}{'time':>7}"
    print(head + (f"{'gated ms':>10}{'gated/dense':>13}" if args.gated else ""))
    for r in result["rows"]:
        line = f"{'-'.join(map(str, r['widths'])):<12}{r['flops']:>7.2f}{r['dense_ms']:>9.1f}{r['time']:>7.2f}"
        if args.gated:
            line += f"{r['gated_ms']:>10.1f}{r['gated_over_dense']:>13.2f}"
        print(line)
    print(f"load average (1 min): {result['load_before']:.2f} -> {result['load_after']:.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                   "jax": jax.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
                   "command": " ".join(["python", "experiments/bench_widths.py", *(argv or sys.argv[1:])]),
                   "depth": args.depth, "batch": args.batch, "repeats": args.repeats, **result}, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
