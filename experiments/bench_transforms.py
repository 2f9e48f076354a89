"""Cost of the Continuous Sparsification transform, and of parallel vs sequential ticket search.

    python experiments/bench_transforms.py [--repeats 15] [--skip-search]

1. Jitted train step with the CS transform (soft masks on the kernels, penalty, mask optimizer) vs
   the same model and weight optimizer without it: ResNet-20 (masks on 3x3 convs) and LeNet-300-100
   (masks on all kernels), batch 128. Timed side by side, interleaved, median of ``--repeats``.
2. Parallel ticket search: 4 ``s_init`` values in one vmapped program vs 4 sequential searches, on
   the embedded default of ``experiments/tickets.py`` (LeNet-300-100, mnist_subset). Reported as
   wall time of whole searches (compilation included) and as steady-state step time.

Writes ``runs/bench/transforms_bench.json`` (``--out experiments/results/transforms_bench.json`` records it).
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

from pae import sparsity as sp
from pae.core import Context, select as S
from pae.data import load_dataset
from pae.models import get_model
from pae.train import create_train_state, data_mesh, make_task, make_train_step


def _batch(shape, batch, seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32),
            "targets": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
            "mask": jnp.ones(batch, jnp.float32)}


def step_ratio(name, select, shape, batch=128, repeats=15):
    model = get_model(name, 10)
    data = _batch(shape, batch)
    cfg = sp.SearchConfig(epochs=10, milestones=(5,))
    plain_tx = sp.search._weights_tx(cfg, 100)
    cs_tx = sp.cs_optimizer(cfg, 100)
    t = sp.continuous_sparsification(select, s_init=0.0, lmbda=1e-8)
    runs = {
        "plain": (make_train_step(model, plain_tx),
                  create_train_state(model, plain_tx, data["inputs"][:1], 0), {}),
        "cs": (make_train_step(model, cs_tx, reparam=t.apply, penalty=t.penalty),
               create_train_state(model, cs_tx, data["inputs"][:1], 0, t.init), Context.make(3.0)),
    }
    states = {k: v[1] for k, v in runs.items()}
    for k, (step, _, ctx) in runs.items():  # compile + warm-up
        for _ in range(3):
            states[k], _ = step(states[k], data, ctx)
        jax.block_until_ready(states[k])
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, (step, _, ctx) in runs.items():
            began = time.perf_counter()
            states[k], _ = step(states[k], data, ctx)
            jax.block_until_ready(states[k])
            times[k].append(time.perf_counter() - began)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "batch": batch, "plain_ms": med["plain"] * 1e3, "cs_ms": med["cs"] * 1e3,
            "ratio": med["cs"] / med["plain"]}


def search_ratio(s_inits, cfg, repeats_steps=30):
    ds = load_dataset("mnist_subset")
    task = make_task(get_model("lenet300_100", 10), ds, mesh=data_mesh(jax.devices()[:1]))
    began = time.perf_counter()
    sp.cs_search(task, cfg, list(s_inits))
    parallel = time.perf_counter() - began
    began = time.perf_counter()
    for s0 in s_inits:
        sp.cs_search(task, cfg, s0)
    sequential = time.perf_counter() - began
    return {"s_inits": list(s_inits), "rounds": cfg.rounds, "epochs": cfg.epochs,
            "parallel_s": parallel, "sequential_s": sequential, "ratio": parallel / sequential}


def steady_state_search_step(n, repeats=30):
    """Median time of one vmapped search step over n runs vs n times one single-run step."""
    model = get_model("lenet300_100", 10)
    data = _batch((28, 28, 1), 64)
    cfg = sp.SearchConfig(epochs=10, milestones=(7,))
    tx = sp.cs_optimizer(cfg, 63)
    s_arr = jnp.linspace(-0.2, 0.0, n)
    mk = lambda s0: sp.continuous_sparsification(None, s0)  # noqa: E731
    single_t = mk(-0.1)
    single = make_train_step(model, tx, reparam=single_t.apply, penalty=single_t.penalty)
    st1 = create_train_state(model, tx, data["inputs"][:1], 0, single_t.init)

    def pstep(states, batch, ctx):
        def one(s, s0):
            t = mk(s0)
            return make_train_step(model, tx, reparam=t.apply, penalty=t.penalty, donate=False)(
                s, batch, ctx)
        return jax.vmap(one)(states, s_arr)

    par = jax.jit(pstep, donate_argnums=0)
    stn = jax.tree.map(lambda x: jnp.stack([x] * n), st1)
    stn = stn.replace(params=jax.vmap(sp.with_s_init)(stn.params, s_arr))  # one s_init per run
    ctx = Context.make(2.0)
    for _ in range(3):
        st1, _ = single(st1, data, ctx)
        stn, _ = par(stn, data, ctx)
    jax.block_until_ready((st1, stn))
    t1, tn = [], []
    cpu1 = 0.0
    for _ in range(repeats):
        b, c = time.perf_counter(), time.process_time()
        st1, _ = single(st1, data, ctx)
        jax.block_until_ready(st1)
        t1.append(time.perf_counter() - b)
        cpu1 += time.process_time() - c
        b = time.perf_counter(); stn, _ = par(stn, data, ctx); jax.block_until_ready(stn)
        tn.append(time.perf_counter() - b)
    m1, mn = statistics.median(t1), statistics.median(tn)
    flops = _flops(single, st1, data, ctx)
    return {"runs": n, "single_step_ms": m1 * 1e3, "vmapped_step_ms": mn * 1e3,
            "ratio_vs_sequential": mn / (n * m1),
            # how much of the machine one run already keeps busy: no idle hardware, no vmap saving
            "single_step_cores_busy": cpu1 / sum(t1), "single_step_gflops": flops / m1 / 1e9,
            "vmapped_step_gflops": n * flops / mn / 1e9}


def _flops(jitted, *args) -> float:
    """XLA's flop count of one call (0 where the backend gives no cost analysis)."""
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--search-epochs", type=int, default=10)
    p.add_argument("--search-rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join("runs", "bench",
                                                 "transforms_bench.json"))
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{os.cpu_count()} cpus")
    out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
           "jax": jax.__version__, "machine": platform.machine(), "steps": [], "search": None}
    print(f"{'model':<14}{'plain ms':>10}{'CS ms':>10}{'ratio':>8}")
    for name, select, shape in (("resnet20", S.conv_kernels((3, 3)), (32, 32, 3)),
                                ("lenet300_100", S.kernels(), (28, 28, 1))):
        row = step_ratio(name, select, shape, repeats=args.repeats)
        out["steps"].append(row)
        print(f"{name:<14}{row['plain_ms']:>10.2f}{row['cs_ms']:>10.2f}{row['ratio']:>8.3f}")
    steady = steady_state_search_step(4)
    out["search_steady_state"] = steady
    print(f"search step, 4 runs: vmapped {steady['vmapped_step_ms']:.2f} ms vs 4 x "
          f"{steady['single_step_ms']:.2f} ms sequential: ratio {steady['ratio_vs_sequential']:.3f} "
          f"(one run: {steady['single_step_gflops']:.0f} GFLOP/s, {steady['single_step_cores_busy']:.2f} "
          f"cores busy; four vmapped: {steady['vmapped_step_gflops']:.0f} GFLOP/s)")
    if not args.skip_search:
        cfg = sp.SearchConfig(rounds=args.search_rounds, epochs=args.search_epochs, batch_size=64,
                              milestones=(7,), rewind_epoch=2)
        row = search_ratio([-0.3, -0.2, -0.1, 0.0], cfg)
        out["search"] = row
        print(f"ticket search, 4 s_init, {cfg.rounds}x{cfg.epochs} epochs: parallel "
              f"{row['parallel_s']:.1f} s vs sequential {row['sequential_s']:.1f} s: ratio "
              f"{row['ratio']:.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
