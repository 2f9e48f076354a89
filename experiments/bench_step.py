"""pae's train step against a minimal plain-Flax step of the same model, side by side in one process.

    python experiments/bench_step.py [--repeats 30] [--out experiments/results/bench_step.json]

For ResNet-20 (32x32x3) and LeNet-300-100 (28x28x1) at batch 128, SGD with momentum 0.9:

* ``pae``: the step the engine (:func:`pae.train.train_phases`) compiles for a plain phase:
  ``make_train_step`` with the identity transform, a :class:`pae.Context`, the padding mask passed
  to the model, masked cross-entropy and metric sums;
* ``flax``: the minimal step a Flax user writes: mean cross-entropy, ``jax.grad``, ``tx.update``,
  ``optax.apply_updates``, BatchNorm statistics carried; also jitted with the state donated.

The two steps alternate (pae, flax, pae, ...) so that machine load hits both alike; the table gives
the median wall time of each, their ratio, the CPU time per step (process time: a figure taken
while other processes compete shows it as wall >> cpu / cores) and the 1-minute load average before
and after. Writes JSON under ``runs/`` unless ``--out`` says otherwise.
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

from pae import models
from pae.core import Context, identity
from pae.train import create_train_state, make_train_step


def flax_step(model, tx):
    """The minimal plain-Flax train step: ``(params, batch_stats, opt_state, x, y) -> same + loss``."""

    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            variables = {"params": p, "batch_stats": batch_stats} if batch_stats else {"params": p}
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates.get("batch_stats", {})

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def compare(name: str, input_shape, batch: int = 128, repeats: int = 30, seed: int = 0) -> dict:
    model = models.get_model(name, 10)
    rng = np.random.default_rng(seed)
    data = {"inputs": jnp.asarray(rng.normal(size=(batch, *input_shape)), jnp.float32),
            "targets": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
            "mask": jnp.ones(batch, jnp.float32)}
    tx = optax.sgd(0.1, momentum=0.9)
    t = identity()
    pae_step = make_train_step(model, tx, reparam=t.apply, penalty=t.penalty, pass_mask=True)
    ctx = Context.make()
    state = create_train_state(model, tx, data["inputs"][:1], seed)
    plain = flax_step(model, tx)
    p = jax.tree.map(jnp.copy, (state.params, state.batch_stats, state.opt_state))

    def run_pae():
        nonlocal state
        state, _ = pae_step(state, data, ctx)
        jax.block_until_ready(state)

    def run_flax():
        nonlocal p
        *p, _ = plain(*p, data["inputs"], data["targets"])
        jax.block_until_ready(p)

    for _ in range(3):  # compile and warm up
        run_pae()
        run_flax()
    load_before = os.getloadavg()[0]
    wall = {"pae": [], "flax": []}
    cpu = {"pae": [], "flax": []}
    for _ in range(repeats):
        for key, fn in (("pae", run_pae), ("flax", run_flax)):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    return {"model": name, "batch": batch, "repeats": repeats,
            "pae_ms": med["pae"] * 1e3, "flax_ms": med["flax"] * 1e3, "ratio": med["pae"] / med["flax"],
            "pae_cpu_ms": statistics.median(cpu["pae"]) * 1e3,
            "flax_cpu_ms": statistics.median(cpu["flax"]) * 1e3,
            "pae_min_ms": min(wall["pae"]) * 1e3, "flax_min_ms": min(wall["flax"]) * 1e3,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


#: the issue's targets: pae's step over the plain-Flax step
TARGETS = {"resnet20": 1.03, "lenet300_100": 1.10}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--out", default="runs/bench/bench_step.json")
    args = parser.parse_args(argv)
    shapes = {"resnet20": (32, 32, 3), "lenet300_100": (28, 28, 1)}
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{os.cpu_count()} cores")
    print(f"{'model':<14}{'pae ms':>9}{'flax ms':>9}{'ratio':>7}{'target':>8}{'pae cpu':>9}"
          f"{'flax cpu':>9}{'load':>11}")
    rows = []
    for name in args.models:
        r = compare(name, shapes[name], repeats=args.repeats)
        r["target"] = TARGETS[name]
        rows.append(r)
        print(f"{name:<14}{r['pae_ms']:>9.2f}{r['flax_ms']:>9.2f}{r['ratio']:>7.3f}{r['target']:>8.2f}"
              f"{r['pae_cpu_ms']:>9.2f}{r['flax_cpu_ms']:>9.2f}"
              f"{r['load_before']:>5.2f}->{r['load_after']:<5.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                   "jax": jax.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
                   "command": " ".join(["python", "experiments/bench_step.py", *(argv or sys.argv[1:])]),
                   "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
