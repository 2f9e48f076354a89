"""Train-step time with quantization noise vs without, and the exported model's inference vs the
float model's, side by side in one process (issue 12: weight + activation noise <= 1.25x the plain
step, ResNet-20, batch 128; report the exported model's bytes and latency).

    python experiments/bench_quant.py [--parts train inference] [--repeats 20] [--batch 128]
        [--inference-batches 1 128] [--out runs/bench/bench_quant.json]

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
1-minute load average before and after.

Inference (``--parts inference``): the same model's float forward (``model.apply``, jitted) against
its export (:func:`pae.quant.export`, jitted ``apply``; ``packed_matmul``'s default backend: the
jnp reference path on CPU, the Pallas kernels on a GPU/TPU), alternating, at each of
``--inference-batches``. The exported net is the float one with weight widths drawn around 3 bits
(normal logits, so most layers keep two palette levels: two GEMMs each, the slower case) and a
palette assigned; bytes are :func:`pae.quant.size_bytes`'s (fp32, in memory with the kernels' tile
padding, in the file). ``max_abs_diff``: exported logits against the phase-2 model's, a check that
the timed program computes the right thing.

Writes JSON under ``runs/`` unless ``--out`` says otherwise.
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

import pae
from pae import models, quant as q
from pae.core import Context, identity
from pae.train import init_state, make_train_step

#: issue 12: weight + activation noise step over the plain step
TARGET = 1.25
#: input shape of each model the benchmark takes
_SHAPES = {"resnet20": (32, 32, 3), "lenet300_100": (28, 28, 1), "lenet5": (28, 28, 1)}


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


def _phase2(model, example, seed: int):
    """Float variables and a phase-2 latent of ``model``: widths drawn around 3 bits, palettes
    assigned (the transition into phase 2, as after training)."""
    variables = model.init(jax.random.PRNGKey(seed), example, train=False)
    latent = q.noise_injection().init(variables["params"], None)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 10_000))
    latent = pae.core.map_nodes(
        lambda n: n.replace(logits=jax.random.normal(next(keys), n.logits.shape) - 1.0), latent,
        q.NoisyWeight)
    return variables, q.assign_palette(jax.device_get(latent))


def _alternate(fns: dict, repeats: int) -> dict:
    """Median wall seconds of each ``fns[k]()`` called in turn ``repeats`` times (after 3 warm-ups)."""
    for _ in range(3):
        for fn in fns.values():
            jax.block_until_ready(fn())
    wall = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            wall[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in wall.items()}


def compare_inference(model_name: str = "resnet20", input_shape=(32, 32, 3), batches=(1, 128),
                      repeats: int = 20, seed: int = 0) -> list[dict]:
    """One row per batch size: float vs exported forward, median ms and their ratio, bytes."""
    model = models.get_model(model_name, 10)
    rng = np.random.default_rng(seed)
    variables, latent = _phase2(model, jnp.zeros((1, *input_shape), jnp.float32), seed)
    stats = variables.get("batch_stats", {})
    exported = q.export(model, latent, stats)
    sizes = q.size_bytes(exported)
    fp = jax.jit(lambda v, x: model.apply(v, x, train=False))
    phase2 = jax.jit(lambda lat, s, x: model.apply(
        {"params": q.palette_quantizer().apply(lat, None), "batch_stats": s}, x, train=False))
    packed = jax.jit(exported.apply)
    segments = [len(layer.bits) for layer in exported.tree["layers"].values()]
    rows = []
    for batch in batches:
        x = jnp.asarray(rng.normal(size=(batch, *input_shape)), jnp.float32)
        diff = float(jnp.max(jnp.abs(packed(exported.tree, x) - phase2(latent, stats, x))))
        load_before = os.getloadavg()[0]
        med = _alternate({"fp": lambda: fp(variables, x),
                          "exported": lambda: packed(exported.tree, x)}, repeats)
        rows.append({"model": model_name, "batch": batch, "repeats": repeats,
                     "fp_ms": med["fp"] * 1e3, "exported_ms": med["exported"] * 1e3,
                     "ratio": med["exported"] / med["fp"], "max_abs_diff": diff,
                     "layers": len(segments), "two_level_layers": sum(s == 2 for s in segments),
                     "fp32_bytes": sizes["fp32"], "memory_bytes": sizes["memory"],
                     "file_bytes": sizes["file"], "load_before": load_before,
                     "load_after": os.getloadavg()[0]})
    return rows


def main(argv=None):
    from pae.train.cli import one_line_errors
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    one_line_errors(parser)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", default="resnet20", choices=sorted(_SHAPES))
    parser.add_argument("--parts", nargs="+", default=["train", "inference"],
                        choices=["train", "inference"])
    parser.add_argument("--inference-batches", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--out", default="runs/bench/bench_quant.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or min(args.inference_batches) < 1:
        raise ValueError(f"--repeats, --batch and --inference-batches must be >= 1, got "
                         f"{args.repeats}, {args.batch}, {args.inference_batches}")
    shape = _SHAPES[args.model]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{os.cpu_count()} cores")
    record = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "jax": jax.__version__, "cpu_count": os.cpu_count(),
              "command": " ".join(["python", "experiments/bench_quant.py", *(argv or [])])}
    if "train" in args.parts:
        record["row"] = _train_table(args, shape)
    if "inference" in args.parts:
        record["inference"] = _inference_table(args, shape)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")
    return record


def _inference_table(args, shape) -> list[dict]:
    rows = compare_inference(args.model, shape, tuple(args.inference_batches), args.repeats)
    print(f"{'model':<14}{'batch':>6}{'fp ms':>10}{'export ms':>11}{'ratio':>8}{'fp32 KB':>10}"
          f"{'memory KB':>11}{'file KB':>9}{'load':>12}")
    for r in rows:
        print(f"{r['model']:<14}{r['batch']:>6}{r['fp_ms']:>10.2f}{r['exported_ms']:>11.2f}"
              f"{r['ratio']:>8.2f}{r['fp32_bytes'] / 1e3:>10.1f}{r['memory_bytes'] / 1e3:>11.1f}"
              f"{r['file_bytes'] / 1e3:>9.1f}{r['load_before']:>6.2f}->{r['load_after']:<5.2f}")
    print(f"({rows[0]['two_level_layers']} of {rows[0]['layers']} layers with two palette levels; "
          f"exported vs phase-2 logits max |diff| {max(r['max_abs_diff'] for r in rows):.2e})")
    return rows


def _train_table(args, shape) -> dict:
    r = compare(args.model, shape, args.batch, args.repeats)
    print(f"{'model':<10}{'plain ms':>10}{'w ms':>9}{'w+a ms':>9}{'w/plain':>9}{'w+a/plain':>11}"
          f"{'target':>8}{'load':>12}")
    print(f"{r['model']:<10}{r['plain_ms']:>10.1f}{r['weights_ms']:>9.1f}{r['weights+acts_ms']:>9.1f}"
          f"{r['ratio_weights']:>9.3f}{r['ratio_weights_acts']:>11.3f}{TARGET:>8.2f}"
          f"{r['load_before']:>6.2f}->{r['load_after']:<5.2f}")
    print(f"cpu ms per step: plain {r['plain_cpu_ms']:.1f}, weights {r['weights_cpu_ms']:.1f}, "
          f"weights+acts {r['weights+acts_cpu_ms']:.1f}")
    return r


if __name__ == "__main__":
    from pae.train.cli import run_script
    run_script(main, sys.argv[1:])
