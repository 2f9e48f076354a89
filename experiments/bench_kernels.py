"""Benchmark: packed low-bit matmul (pallas_kernels.packed_matmul) vs jnp.dot on bf16 weights.

On a GPU/TPU, for M in {1, 16, 128, 4096}, K = N in {4096, 8192} and every bit width (plus a
two-level 2+8-bit layer), it times both paths side by side in one process (interleaved repeats,
median), and prints the ratio, achieved GB/s, the fraction of the measured copy bandwidth, and
the ideal weight-only ratio (bf16 bytes / packed bytes, ~16/bits).  On CPU there is no kernel to
time: it prints the memory-footprint ratios and reference-path timings and says so.

What is timed (``--timer``):
  rotate (default on a GPU/TPU) one executable of n independent calls, each on its own copy of the
         weight (copies worth 512 MiB, ~8x the L2 of an H100/H200), every output returned: each
         call reads its weight from device memory as a model's layer would, and no call can be
         merged, hoisted or removed; the executable is dispatched back to back (asynchronously).
  loop   (default on CPU) n calls of the jitted function in one executable (``fori_loop``), chained
         only through ``lax.optimization_barrier``: no elementwise pass or reduction is added to a
         call, but the same weight is read every time (from the L2 cache when it fits).
  calls  n separate dispatches of the jitted function, blocking on the last.
The harness's own per-call cost is measured (``loop_overhead_s``) and reported, never subtracted.
At M >= ``LARGE_M_CROSSOVER`` the dispatch hands ``backend="triton"`` to dequantize + XLA GEMM; the
kernel itself is then also timed as ``triton[kernel]`` (its ``choose_blocks``), so the rows show
the crossover.  ``--backend reference`` times dequantize + XLA GEMM at every M.
The copy bandwidth is a real copy, y = x + 1 returned in full (1 GiB read + 1 GiB written).

Results go to runs/bench_kernels/kernels_<platform>_<device>_<time>.json (untracked);
``--out experiments/results`` (a directory) or ``--out FILE.json`` writes elsewhere.  Every row
carries the device, jax/jaxlib versions, the kernel path that ran and the exact command.

    python experiments/bench_kernels.py                  # full grid on an accelerator
    python experiments/bench_kernels.py --m 1 16 --kn 4096 --bits 4 2
    python experiments/bench_kernels.py --backend triton mosaic_gpu reference --out experiments/results
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform as _platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels.lowering import abstract_packed

ROOT = Path(__file__).resolve().parents[1]

BITS = ["1", "2", "3", "4", "8", "2+8"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 4096])
    ap.add_argument("--kn", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--bits", nargs="+", default=BITS, help="1 2 3 4 8 and/or 2+8 (two-level layer)")
    ap.add_argument("--backend", nargs="+", default=["auto"], choices=pk.BACKENDS,
                    help="packed paths timed side by side, e.g. --backend triton mosaic_gpu")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats (median)")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per timed sample")
    ap.add_argument("--cpu-m", type=int, nargs="+", default=[1, 16, 128],
                    help="M values timed on CPU (reference path)")
    ap.add_argument("--triton-blocks", nargs="+", default=[], metavar="BM,BN,SPLITS,WARPS,STAGES[,ROWS]",
                    help="extra Triton block configurations timed side by side (to tune BLOCK_TABLE)")
    ap.add_argument("--triton-jnp-dequant", action="store_true",
                    help="also time the Triton kernel with the jnp magic-number dequantization "
                         "instead of the inline PTX (A/B of the bit tricks)")
    ap.add_argument("--timer", choices=sorted(TIMERS), default=None,
                    help="rotate (accelerator default): n calls over n weight copies in one executable; "
                         "loop (CPU default): n chained calls of one weight in a fori_loop; "
                         "calls: n host dispatches")
    ap.add_argument("--out", default=None,
                    help="a .json file, or a directory for kernels_<platform>_<device>.json "
                         "(default: runs/bench_kernels/, untracked)")
    args = ap.parse_args(argv)
    if args.timer is None:
        args.timer = "loop" if platform_name() == "cpu" else "rotate"
    return args


# ------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------
def chained(f, n: int):
    """jit of n calls of f(x, w) in one executable, with *no* added arithmetic.

    A ``fori_loop`` whose carry is (x, w, y): each iteration passes (x, w, y) through
    ``lax.optimization_barrier`` and computes y = f(x', w') from the barrier's outputs.  The barrier
    makes x' and w' formally depend on the previous y, so XLA can neither hoist the call out of the
    loop nor merge iterations, and it moves no data (no kernel, no elementwise pass, no reduction).
    What is timed per iteration is f itself plus the loop's own per-iteration cost, which
    ``loop_overhead`` measures separately (reported, never subtracted)."""
    def run(x, w):
        y0 = jax.eval_shape(f, x, w)
        y0 = jnp.zeros(y0.shape, y0.dtype)

        def body(_, c):
            x_, w_, _y = jax.lax.optimization_barrier(c)
            return (x_, w_, f(x_, w_))

        return jax.lax.fori_loop(0, n, body, (x, w, y0))[2]

    return jax.jit(run)


def rotating(f, n: int):
    """jit of n independent calls f(x_i, w_i), one per copy of the operands (``xws``: n pairs),
    written out with every output returned: no loop, and no two calls share an operand, so none
    can be merged, hoisted or removed; the copies make each call read its weight from device
    memory rather than from the L2 cache (see ``rotation_copies``)."""
    g = jax.jit(f)  # traced and lowered once, called n times

    def run(xws):
        return tuple(g(x, w) for x, w in xws[:n])

    return jax.jit(run)


def dispatched(f, n: int):
    """n separately dispatched calls of jit(f); the caller blocks on the last one only."""
    g = jax.jit(f)

    def run(x, w):
        y = None
        for _ in range(n):
            y = g(x, w)
        return y

    return run


ROTATE_BYTES = 1 << 29  # rotate over copies worth 512 MiB, ~8x an H100/H200 L2 (50 / 60 MB)
MAX_COPIES = 128


def rotation_copies(operand) -> int:
    """Copies of the rotated operand so that together they exceed ``ROTATE_BYTES`` (1..MAX_COPIES)."""
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(operand))
    return int(min(MAX_COPIES, max(1, -(-ROTATE_BYTES // max(nbytes, 1)))))


def _copies(operand, k: int) -> tuple:
    """k distinct device buffers holding ``operand`` (a pytree; None leaves stay None)."""
    return tuple(jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), operand) for _ in range(k))


def calibrate(make, f, x, w, min_time: float) -> int:
    """Inner repeat count so one sample takes about min_time seconds."""
    n = 1
    while True:
        g = make(f, n)
        jax.block_until_ready(g(x, w))
        t0 = time.perf_counter()
        jax.block_until_ready(g(x, w))
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 4096:
            return n
        n = min(4096, max(n * 2, int(n * min_time / max(dt, 1e-6)) + 1))


def _rotating_sampler(f, x, w, min_time: float):
    """(sample() -> seconds per call) for the rotate timer: one executable of n calls over n copies
    of (x, w), dispatched k times back to back per sample (asynchronous dispatch keeps the device
    busy), k calibrated to min_time."""
    n = rotation_copies((x, w))
    xws = _copies((x, w), n)
    g = rotating(f, n)
    jax.block_until_ready(g(xws))
    k = 1
    while True:
        t0 = time.perf_counter()
        jax.block_until_ready([g(xws) for _ in range(k)])
        dt = time.perf_counter() - t0
        if dt >= min_time or k >= 1024:
            break
        k = min(1024, max(2 * k, int(k * min_time / max(dt, 1e-6)) + 1))

    def sample():
        t0 = time.perf_counter()
        jax.block_until_ready([g(xws) for _ in range(k)])
        return (time.perf_counter() - t0) / (k * n)

    return sample


def _repeating_sampler(make):
    """The sampler of a timer that calls one executable ``make(f, n)`` per sample (loop, calls)."""
    def sampler(f, x, w, min_time: float):
        n = calibrate(make, f, x, w, min_time)
        g = make(f, n)
        jax.block_until_ready(g(x, w))

        def sample():
            t0 = time.perf_counter()
            jax.block_until_ready(g(x, w))
            return (time.perf_counter() - t0) / n

        return sample

    return sampler


#: timer name -> sampler(f, x, w, min_time) -> sample() -> seconds per call
TIMERS = {"loop": _repeating_sampler(chained), "rotate": _rotating_sampler, "calls": _repeating_sampler(dispatched)}


def time_side_by_side(fns: dict, args: dict, repeats: int, min_time: float, timer: str = "loop") -> dict:
    """Median seconds per call of each function, sampled in interleaved order."""
    samplers = {name: TIMERS[timer](f, *args[name], min_time) for name, f in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, sample in samplers.items():
            samples[name].append(sample())
    return {name: statistics.median(s) for name, s in samples.items()}


def loop_overhead(repeats: int, min_time: float, timer: str) -> float:
    """Seconds per iteration of the timing harness around a call that does (almost) nothing:
    f returns a one-element slice of x (a tiny copy), so this is the harness's floor."""
    x = jnp.ones((8, 128), jnp.bfloat16)
    f = lambda a, _: a[:1, :1]  # noqa: E731
    return time_side_by_side({"empty": f}, {"empty": (x, None)}, repeats, min_time, timer)["empty"]


def copy_fn(a, _):
    """A real copy: y = a + 1 returned in full (reads the array once and writes it once; nothing
    consumes y inside the executable, so XLA cannot fuse it into a reduction)."""
    return a + jnp.ones((), a.dtype)


def copy_bandwidth(repeats: int, min_time: float, timer: str = "loop", nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in GB/s: y = x + 1 on a 1 GiB bf16 array, bytes read + written."""
    x = jnp.ones((nbytes // 2 // 4096, 4096), jnp.bfloat16)
    t = time_side_by_side({"copy": copy_fn}, {"copy": (x, None)}, repeats, min_time, timer)["copy"]
    return 2 * x.size * x.dtype.itemsize / t / 1e9  # one read and one write of the array per call


# ------------------------------------------------------------------------------------------
# Problem construction
# ------------------------------------------------------------------------------------------
def make_layer(rng, label: str, k: int, n: int):
    """Random packed layer: '4' -> one 4-bit segment; '2+8' -> 3/4 of K at 2 bits, 1/4 at 8 bits."""
    bits = [int(b) for b in label.split("+")]
    ks = [k] if len(bits) == 1 else [k * 3 // 4, k - k * 3 // 4]
    codes = [rng.integers(0, 2 ** b, size=(kk, n), dtype=np.int32) for b, kk in zip(bits, ks)]
    scales = [rng.uniform(0.5, 1.5, size=n).astype(np.float32) / 2 ** b for b in bits]
    return pk.pack_mixed(codes, bits, scales)


def platform_name() -> str:
    d = jax.devices()[0]
    return d.platform


def device_slug() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return re.sub(r"[^a-z0-9]+", "-", str(kind).lower()).strip("-")


def command_line() -> str:
    """The command as run, relative to the repository root where possible."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).resolve() == Path(__file__).resolve():
        argv[0] = "experiments/bench_kernels.py"
    return " ".join(["python"] + [shlex.quote(a) for a in argv])


def header() -> dict:
    d = jax.devices()[0]
    import jaxlib

    return {
        "device": str(getattr(d, "device_kind", d.platform)),
        "platform": d.platform,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": _platform.python_version(),
        "command": command_line(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def gpu_backend_note(path: str) -> str:
    return {"tpu": "Mosaic TPU (pallas_call)", "triton": "Pallas Triton (pallas_call + Triton compiler params)",
            "mosaic_gpu": "Pallas Mosaic GPU (plgpu.kernel, wgmma)",
            "reference": "jnp reference (XLA)"}[path]


# ------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------
def target(m: int, label: str) -> float | None:
    """The issue's H100/H200 speed targets: ratio to bf16 jnp.dot (None where none is set)."""
    if m <= 16:
        return {"4": 3.0, "2": 5.0}.get(label)
    if m >= 4096:
        return 0.8
    return None


def row_context(info: dict) -> dict:
    """The provenance every figure carries."""
    return {k: info[k] for k in ("device", "platform", "jax", "jaxlib", "command", "timer")}


def path_taken(kw: dict, m: int, packed) -> str:
    """The kernel path and blocks ``packed_matmul(**kw)`` runs for this M (the dispatch may send
    large M to dequantize + XLA dot)."""
    from pallas_kernels.dispatch import plan

    return plan(kw["backend"], m, packed, blocks=kw.get("blocks")).describe()


def parse_blocks(spec: str):
    from pallas_kernels.gpu_triton import TritonBlocks

    vals = [int(v) for v in spec.split(",")]
    if len(vals) not in (5, 6):
        raise SystemExit(f"--triton-blocks {spec!r}: want BM,BN,SPLITS,WARPS,STAGES[,ROWS]")
    return TritonBlocks(*vals[:5], rows=vals[5] if len(vals) == 6 else None)


def variants(args, paths: list[str], m: int, packed) -> list[tuple[str, dict]]:
    """(name, packed_matmul keyword arguments) of every packed path timed for this shape."""
    import dataclasses

    from pallas_kernels.gpu_triton import choose_blocks

    out = [(p, dict(backend=p)) for p in paths]
    for spec in args.triton_blocks:
        out.append((f"triton[{spec}]", dict(backend="triton", blocks=parse_blocks(spec))))
    if args.triton_jnp_dequant and m < LARGE_M():
        b = dataclasses.replace(choose_blocks(m, packed), asm=False)
        out.append(("triton[jnp-dq]", dict(backend="triton", blocks=b)))
    if m >= LARGE_M():  # the dispatch hands over to dequantize + XLA GEMM: time the kernels too
        if "triton" in paths:
            out.append(("triton[kernel]", dict(backend="triton", blocks=choose_blocks(m, packed))))
        if "mosaic_gpu" in paths:
            from pallas_kernels.gpu_mosaic import MosaicBlocks

            out = [(p, kw) for p, kw in out if p != "mosaic_gpu"]  # the same XLA path as triton's
            out.append(("mosaic_gpu[kernel]", dict(backend="mosaic_gpu", blocks=MosaicBlocks())))
    return out


def LARGE_M() -> int:  # noqa: N802
    from pallas_kernels.dispatch import LARGE_M_CROSSOVER

    return LARGE_M_CROSSOVER


def run_accelerator(args, info: dict, save=lambda rows: None) -> list[dict]:
    paths = list(dict.fromkeys(pk.resolve_backend(b) for b in args.backend))
    info["backends"] = {p: gpu_backend_note(p) for p in paths}
    bw = copy_bandwidth(args.repeats, args.min_time, args.timer)
    info["copy_bandwidth_GBps"] = round(bw, 1)
    info["loop_overhead_s"] = loop_overhead(args.repeats, args.min_time, args.timer)
    ctx = row_context(info)
    print(f"device: {info['device']}  jax {info['jax']}  backends: {info['backends']}  timer: {args.timer}")
    print(f"measured copy bandwidth (y = x + 1, read + write): {bw:.0f} GB/s; harness floor per call: "
          f"{info['loop_overhead_s'] * 1e6:.1f} us (included in every time below, not subtracted)")
    print("ratio = t(bf16 jnp.dot) / t(packed); ideal = bf16 bytes / packed bytes (weight-only "
          "small-M roofline); %copyBW = achieved bytes/s / measured copy bandwidth\n")
    dense_fn = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'K=N':>5} {'M':>5} {'bits':>4} {'backend':>10} | {'bf16 us':>9} {'packed us':>9} {'ratio':>6} "
          f"{'ideal':>6} {'target':>6} | {'GB/s':>6} {'%copyBW':>7} | {'TFLOP/s':>7} {'relerr':>8} | path")
    for kn in args.kn:
        w_dense = jnp.asarray(rng.standard_normal((kn, kn)) * 0.02, jnp.bfloat16)
        for label in args.bits:
            packed = jax.device_put(make_layer(rng, label, kn, kn))
            for m in args.m:
                x = jnp.asarray(rng.standard_normal((m, kn)), jnp.bfloat16)
                fns, inputs = {"dense": dense_fn}, {"dense": (x, w_dense)}
                kwargs = dict(variants(args, paths, m, packed))
                y_ref = jax.jit(lambda x, p: pk.reference_packed_matmul(x, p, out_dtype=jnp.float32))(x, packed)
                errs = {}
                for path, kw in kwargs.items():
                    f = functools.partial(lambda x, p, kw: pk.packed_matmul(x, p, **kw), kw=kw)
                    try:
                        jax.eval_shape(f, x, packed)
                    except ValueError as e:  # e.g. a width the opt-in Mosaic GPU kernel does not cover
                        print(f"{kn:>5} {m:>5} {label:>4} {path:>10} | skipped: {str(e).splitlines()[0][:80]}")
                        rows.append(dict(ctx, kn=kn, m=m, bits=label, backend=path, skipped=str(e)))
                        continue
                    try:  # compile and check first: a kernel that fails here is recorded, not timed
                        y = jax.jit(f)(x, packed).astype(jnp.float32)  # bf16 out: ~2e-3 of rounding
                        errs[path] = float(jnp.max(jnp.abs(y - y_ref)) / jnp.max(jnp.abs(y_ref)))
                    except Exception as e:  # noqa: BLE001 - report any compiler/runtime failure and go on
                        msg = f"{type(e).__name__}: {e}"
                        print(f"{kn:>5} {m:>5} {label:>4} {path:>10} | FAILED: {msg.splitlines()[0][:160]}")
                        rows.append(dict(ctx, kn=kn, m=m, bits=label, backend=path, failed=msg[:4000]))
                        save(rows)
                        continue
                    fns[path], inputs[path] = f, (x, packed)
                if len(fns) == 1:
                    continue
                t = time_side_by_side(fns, inputs, args.repeats, args.min_time, args.timer)
                moved = packed.nbytes + 2 * m * kn + 2 * m * kn
                for path in fns:
                    if path == "dense":
                        continue
                    err = errs[path]
                    goal = target(m, label)
                    taken = path_taken(kwargs[path], m, packed)
                    row = dict(ctx, kn=kn, m=m, bits=label, backend=path, path=taken,
                               dense_s=t["dense"], packed_s=t[path],
                               ratio=t["dense"] / t[path], ideal_ratio=2 * kn * kn / packed.nbytes,
                               target_ratio=goal, packed_GBps=moved / t[path] / 1e9,
                               frac_copy_bw=moved / t[path] / 1e9 / bw,
                               dense_frac_copy_bw=(2 * kn * kn + 4 * m * kn) / t["dense"] / 1e9 / bw,
                               packed_TFLOPs=2 * m * kn * kn / t[path] / 1e12, rel_err=err,
                               packed_bytes=packed.nbytes, copy_bandwidth_GBps=bw,
                               loop_overhead_s=info["loop_overhead_s"])
                    rows.append(row)
                    save(rows)  # after every row: a run stopped by a time limit keeps its figures
                    mark = "" if goal is None else ("ok" if row["ratio"] >= goal else "MISS")
                    mark = "WRONG" if not err < 2e-2 else mark
                    print(f"{kn:>5} {m:>5} {label:>4} {path:>10} | {t['dense'] * 1e6:>9.1f} {t[path] * 1e6:>9.1f} "
                          f"{row['ratio']:>5.2f}x {row['ideal_ratio']:>5.2f}x {mark:>6} | {row['packed_GBps']:>6.0f} "
                          f"{100 * row['frac_copy_bw']:>6.0f}% | {row['packed_TFLOPs']:>7.1f} {err:>8.1e} | {taken}")
    return rows


def run_cpu(args, info: dict) -> list[dict]:
    info["backends"] = {"reference": gpu_backend_note("reference")}
    ctx = row_context(info)
    print(f"device: {info['device']} (CPU)  jax {info['jax']}")
    print("No GPU/TPU: the Pallas kernels cannot be timed here (speed needs an accelerator).")
    print("Printing the memory footprint ratio and the timings of the jnp reference path.\n")
    rows = []
    print("memory footprint: bf16 weight bytes / packed bytes (incl. scales and padding)")
    print(f"{'K=N':>5} " + " ".join(f"{b:>6}" for b in args.bits))
    for kn in args.kn:
        ratios = []
        for label in args.bits:
            bits = [int(b) for b in label.split("+")]
            ks = [kn] if len(bits) == 1 else [kn * 3 // 4, kn - kn * 3 // 4]
            p = abstract_packed(bits, ks, kn)
            r = 2 * kn * kn / p.nbytes
            ratios.append(r)
            rows.append(dict(ctx, kind="footprint", kn=kn, bits=label, packed_bytes=p.nbytes,
                             bf16_bytes=2 * kn * kn, ratio=r))
        print(f"{kn:>5} " + " ".join(f"{r:>5.2f}x" for r in ratios))
    print("\nreference path (CPU, XLA): jnp.dot on bf16 weights vs reference_packed_matmul")
    print(f"{'K=N':>5} {'M':>5} {'bits':>4} | {'bf16 dot ms':>11} {'reference ms':>12} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for kn in args.kn[:1]:
        w_dense = jnp.asarray(rng.standard_normal((kn, kn)) * 0.02, jnp.bfloat16)
        for label in args.bits:
            packed = make_layer(rng, label, kn, kn)
            for m in args.cpu_m:
                x = jnp.asarray(rng.standard_normal((m, kn)), jnp.bfloat16)
                fns = {"dense": lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
                       "reference": lambda x, p: pk.reference_packed_matmul(x, p)}
                t = time_side_by_side(fns, {"dense": (x, w_dense), "reference": (x, packed)},
                                      max(3, args.repeats // 2), args.min_time, args.timer)
                rows.append(dict(ctx, kind="reference_timing", kn=kn, m=m, bits=label, backend="reference",
                                 dense_s=t["dense"], reference_s=t["reference"],
                                 ratio=t["dense"] / t["reference"]))
                print(f"{kn:>5} {m:>5} {label:>4} | {t['dense'] * 1e3:>11.2f} {t['reference'] * 1e3:>12.2f} "
                      f"{t['dense'] / t['reference']:>5.2f}x")
    print("\nThe reference unpacks the whole weight in XLA every call: these CPU figures say nothing "
          "about kernel speed. Run this script on an H100/H200 / TPU for the kernel figures.")
    return rows


def output_path(out: str | None, plat: str, stamp: str) -> Path:
    """--out FILE.json as given; --out DIR -> DIR/kernels_<platform>_<device>.json; default
    runs/bench_kernels/kernels_<platform>_<device>_<stamp>.json (untracked, never overwritten)."""
    name = f"kernels_{plat}_{device_slug()}"
    if out is None:
        return ROOT / "runs" / "bench_kernels" / f"{name}_{stamp}.json"
    p = Path(out)
    if not p.is_absolute():
        p = Path.cwd() / p
    return p if p.suffix == ".json" else p / f"{name}.json"


def main(argv=None) -> dict:
    args = parse_args(argv)
    for b in args.bits:
        if not all(p in ("1", "2", "3", "4", "8") for p in b.split("+")):
            raise SystemExit(f"--bits {b!r}: use 1 2 3 4 8 or a two-level 'a+b'")
    info = header()
    if argv is not None:  # called from Python: record the arguments actually used
        info["command"] = " ".join(["python", "experiments/bench_kernels.py"] + [shlex.quote(a) for a in argv])
    plat = platform_name()
    info["timer"] = args.timer
    stamp = info["timestamp"].replace(":", "").replace("-", "").replace("+0000", "Z")
    out = output_path(args.out, plat, stamp)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows):
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**info, "rows": rows}, indent=1))
        tmp.replace(out)

    rows = run_cpu(args, info) if plat == "cpu" else run_accelerator(args, info, save)
    result = {**info, "rows": rows}
    save(rows)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    result["_path"] = str(out)
    return result


if __name__ == "__main__":
    main()
