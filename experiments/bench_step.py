"""Jitted train-step time of the reference models, so later benchmarks can quote overheads as ratios.

    python experiments/bench_step.py [--repeats 20] [--out experiments/results/bench_step.json]

Times one SGD-momentum train step (forward, backward, update; BN statistics for ResNet-20) of
ResNet-20 at batch 128 on 32x32x3 inputs and LeNet-300-100 at batch 128 on 28x28 inputs, on
whatever single device JAX picks. Reports the median over ``--repeats`` timed steps after warm-up.
"""
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

from pae import models
from pae.train import create_train_state, make_train_step


def time_step(model, input_shape, classes, batch=128, repeats=20, seed=0):
    rng = np.random.default_rng(seed)
    batch_data = {"inputs": jnp.asarray(rng.normal(size=(batch, *input_shape)), jnp.float32),
                  "targets": jnp.asarray(rng.integers(0, classes, batch), jnp.int32),
                  "mask": jnp.ones(batch, jnp.float32)}
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(model, tx, batch_data["inputs"][:1], seed)
    step = make_train_step(model, tx)
    for _ in range(3):  # compile + warm-up
        state, metrics = step(state, batch_data, {})
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        state, metrics = step(state, batch_data, {})
        jax.block_until_ready(state)
        times.append(time.perf_counter() - began)
    return statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="experiments/results/bench_step.json")
    args = parser.parse_args()
    cases = [("resnet20", models.get_model("resnet20", 10), (32, 32, 3), 10),
             ("lenet300_100", models.get_model("lenet300_100", 10), (28, 28, 1), 10)]
    rows = []
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"{'model':<14} {'batch':>5} {'median ms':>10} {'min ms':>8}")
    for name, model, shape, classes in cases:
        median, best = time_step(model, shape, classes, repeats=args.repeats)
        rows.append({"model": name, "batch": 128, "median_s": median, "min_s": best})
        print(f"{name:<14} {128:>5} {median * 1e3:>10.2f} {best * 1e3:>8.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                   "jax": jax.__version__, "cpu_count": os.cpu_count(),
                   "machine": platform.machine(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
