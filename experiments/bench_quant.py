"""Train-step time with quantization noise vs without, side by side in one process (issue 12's
speed target: weight + activation noise <= 1.25x the plain step, ResNet-20, batch 128).

    python experiments/bench_quant.py [--repeats 20] [--batch 128] [--out runs/bench/bench_quant.json]

Three steps of the same model, data and optimizer (Adam), each the step the engine compiles
(:func:`pae.train.make_train_step`, state donated):

* ``plain``: the identity transform (no quantization);
* ``weights``: phase-1 weight noise (:func:`pae.quant.noise_injection`, learned widths per input
  channel, penalty with a budget);
* ``weights+acts``: the same plus activation noise on the inputs of every quantized layer
  (``QuantConfig(activations=True)``: :func:`pae.quant.act_noise_injection` through the
  :func:`pae.quant.quantize_activations` wrapper, running ranges updated every step).

The steps alternate (plain, weights, weights+acts, plain, ...) so machine load hits them alike; the
table gives the median wall time of each, the ratios to ``plain``, the CPU time per step, and the
1-minute load average before and after. Writes JSON under ``runs/`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pae import models, quant as q
from pae.core import Context, identity
from pae.train import init_state, make_train_step

#: issue 12: weight + activation noise step over the plain step
TARGET = 1.25


def _steps(model_name: str, input_shape, batch: int, seed: int):
    model = models.get_model(model_name, 10)
    rng = np.random.default_rng(seed)
    data = {"inputs": jnp.asarray(rng.normal(size=(batch, *input_shape)), jnp.float32),
            "targets": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
            "mask": jnp.ones(batch, jnp.float32)}
    example = data["inputs"][:1]
    out = {}
    t = identity()
    tx = optax.adam(1e-3)
    state = init_state(model, example, seed)
    out["plain"] = (make_train_step(model, tx, reparam=t.apply, penalty=t.penalty, pass_mask=True),
                    state.replace(opt_state=tx.init(state.params)))
    for name, acts in (("weights", False), ("weights+acts", True)):
        cfg = q.QuantConfig(target_bits=3.0, activations=acts, act_target_bits=4.0 if acts else None)
        t = q.noise_transform(cfg)
        tx = q.quant_optimizer(cfg, "noise")
        m = q.quantize_activations(model) if acts else model
        state = init_state(model, example, seed, t.init)
        if acts:
            state = q.add_act_stats(state)
        out[name] = (make_train_step(m, tx, reparam=t.apply, penalty=t.penalty, pass_mask=True),
                     state.replace(opt_state=tx.init(state.params)))
    return out, data


def compare(model_name: str = "resnet20", input_shape=(32, 32, 3), batch: int = 128,
            repeats: int = 20, seed: int = 0) -> dict:
    steps, data = _steps(model_name, input_shape, batch, seed)
    ctx = Context.make(key=seed)
    states = {k: s for k, (_, s) in steps.items()}

    def run(k):
        states[k], _ = steps[k][0](states[k], data, ctx)
        jax.block_until_ready(states[k])

    for _ in range(3):  # compile and warm up
        for k in steps:
            run(k)
    load_before = os.getloadavg()[0]
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for _ in range(repeats):
        for k in steps:
            w0, c0 = time.perf_counter(), time.process_time()
            run(k)
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    return {"model": model_name, "batch": batch, "repeats": repeats,
            **{f"{k}_ms": med[k] * 1e3 for k in steps},
            **{f"{k}_cpu_ms": statistics.median(cpu[k]) * 1e3 for k in steps},
            "ratio_weights": med["weights"] / med["plain"],
            "ratio_weights_acts": med["weights+acts"] / med["plain"],
            "target": TARGET, "load_before": load_before, "load_after": os.getloadavg()[0]}


def main(argv=None):
    from pae.train.cli import one_line_errors
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    one_line_errors(parser)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "lenet300_100"])
    parser.add_argument("--out", default="runs/bench/bench_quant.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        raise ValueError(f"--repeats and --batch must be >= 1, got {args.repeats}, {args.batch}")
    shape = {"resnet20": (32, 32, 3), "lenet300_100": (28, 28, 1)}[args.model]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{os.cpu_count()} cores")
    r = compare(args.model, shape, args.batch, args.repeats)
    print(f"{'model':<10}{'plain ms':>10}{'w ms':>9}{'w+a ms':>9}{'w/plain':>9}{'w+a/plain':>11}"
          f"{'target':>8}{'load':>12}")
    print(f"{r['model']:<10}{r['plain_ms']:>10.1f}{r['weights_ms']:>9.1f}{r['weights+acts_ms']:>9.1f}"
          f"{r['ratio_weights']:>9.3f}{r['ratio_weights_acts']:>11.3f}{TARGET:>8.2f}"
          f"{r['load_before']:>6.2f}->{r['load_after']:<5.2f}")
    print(f"cpu ms per step: plain {r['plain_cpu_ms']:.1f}, weights {r['weights_cpu_ms']:.1f}, "
          f"weights+acts {r['weights+acts_cpu_ms']:.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                   "jax": jax.__version__, "cpu_count": os.cpu_count(),
                   "command": " ".join(["python", "experiments/bench_quant.py", *(argv or [])]),
                   "row": r}, f, indent=2)
    print(f"wrote {args.out}")
    return r


if __name__ == "__main__":
    from pae.train.cli import run_script
    run_script(main, sys.argv[1:])
