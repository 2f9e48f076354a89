"""experiments/bench_kernels.py measures what its columns say (CPU-checkable parts).

* the timing harness adds no arithmetic to a timed call (only an optimization barrier);
* the bandwidth probe is a real copy (the output is returned in full, no reduction);
* results go under runs/ unless --out says otherwise, with device, versions and command per row.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_kernels")


def _prims(jaxpr, out=None):
    """Primitive names of a jaxpr's array-valued equations (scalar bookkeeping such as a loop
    counter is left out), recursing into sub-jaxprs (jit, while, scan, cond)."""
    out = [] if out is None else out
    for e in jaxpr.eqns:
        if any(getattr(v.aval, "shape", ()) != () for v in e.outvars):
            out.append(e.primitive.name)
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    _prims(sub.jaxpr, out)
                elif hasattr(sub, "eqns"):
                    _prims(sub, out)
    return out


def test_chained_timer_adds_no_arithmetic(bench):
    f = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)  # noqa: E731
    x, w = jnp.ones((3, 16), jnp.bfloat16), jnp.ones((16, 8), jnp.bfloat16)
    run = bench.chained(f, 5)
    loop = _prims(jax.make_jaxpr(run)(x, w).jaxpr)
    alone = _prims(jax.make_jaxpr(f)(x, w).jaxpr)
    assert ("while" in loop or "scan" in loop) and "optimization_barrier" in loop
    body = [p for p in loop if p not in ("while", "scan", "optimization_barrier", "pjit", "jit",
                                         "broadcast_in_dim")]
    # every other array op is f itself (broadcast_in_dim builds the initial carry, outside the loop)
    assert sorted(body) == sorted(alone)
    hlo = jax.jit(run).lower(x, w).as_text()
    assert "reduce" not in hlo and "multiply" not in hlo
    assert jnp.array_equal(run(x, w), f(x, w))


def test_rotating_timer_reads_a_fresh_copy_per_call(bench, monkeypatch):
    """n calls in one program, each on its own copies of x and w (no operand shared, so nothing
    is merged or served from the cache), every output returned, no added arithmetic."""
    monkeypatch.setattr(bench, "ROTATE_BYTES", 5 * (16 * 8 * 2 + 3 * 16 * 2))
    f = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)  # noqa: E731
    x = jnp.arange(48, dtype=jnp.bfloat16).reshape(3, 16)
    w = jnp.arange(128, dtype=jnp.bfloat16).reshape(16, 8)
    n = bench.rotation_copies((x, w))
    assert n == 5
    xws = bench._copies((x, w), n)
    ptrs = {a.unsafe_buffer_pointer() for pair in xws for a in pair}
    assert len(ptrs) == 2 * n  # distinct device buffers
    run = bench.rotating(f, n)
    prims = [p for p in _prims(jax.make_jaxpr(run)(xws).jaxpr) if p not in ("jit", "pjit")]
    assert sorted(prims) == sorted(_prims(jax.make_jaxpr(f)(x, w).jaxpr) * n)
    hlo = run.lower(xws).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert len(entry.split(" parameter(")) - 1 == 2 * n  # every copy reaches the program
    assert all(jnp.array_equal(y, f(x, w)) for y in run(xws))
    # the sampler returns seconds per call, positive and finite
    sample = bench._rotating_sampler(f, x, w, 0.001)
    assert 0 < sample() < 1


def test_copy_probe_is_a_real_copy(bench):
    x = jnp.ones((64, 128), jnp.bfloat16)
    hlo = jax.jit(bench.copy_fn).lower(x, None).as_text()
    assert "reduce" not in hlo
    y = jax.jit(bench.copy_fn)(x, None)
    assert y.shape == x.shape and y.dtype == x.dtype and float(y[0, 0]) == 2.0


def test_cpu_run_writes_under_runs_with_provenance(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    res = bench.main(["--kn", "512", "--bits", "4", "2+8", "--cpu-m", "1", "--repeats", "1",
                      "--min-time", "0.001"])
    path = pathlib.Path(res["_path"])
    assert path.parent == tmp_path / "runs" / "bench_kernels" and path.exists()
    data = json.loads(path.read_text())
    assert data["rows"] and data["command"].startswith("python experiments/bench_kernels.py --kn 512")
    for row in data["rows"]:
        for key in ("device", "platform", "jax", "jaxlib", "command", "timer"):
            assert key in row, key
    # --out DIR writes kernels_<platform>_<device>.json in that directory
    out = tmp_path / "results"
    res = bench.main(["--kn", "512", "--bits", "4", "--cpu-m", "1", "--repeats", "1", "--min-time", "0.001",
                      "--out", str(out)])
    assert pathlib.Path(res["_path"]) == out / "kernels_cpu_cpu.json"


def test_accelerator_code_path_runs_end_to_end(bench, monkeypatch):
    """The GPU/TPU branch, run here with the reference path and tiny sizes, so that a device
    session does not discover a Python error."""
    orig = bench.copy_bandwidth
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a, **k: orig(*a, nbytes=1 << 20, **k))
    args = bench.parse_args(["--kn", "256", "--m", "1", "--bits", "4", "--backend", "reference",
                             "--repeats", "1", "--min-time", "0.001", "--triton-blocks", "16,32,2,4,2,16",
                             "--triton-jnp-dequant", "--timer", "rotate"])
    monkeypatch.setattr(bench, "ROTATE_BYTES", 1 << 20)
    info = dict(bench.header(), timer=args.timer)
    rows = bench.run_accelerator(args, info)
    # the Triton variants need a GPU: recorded as skipped here, timed on a device
    assert [r["backend"] for r in rows if "skipped" in r] == ["triton[16,32,2,4,2,16]", "triton[jnp-dq]"]
    rows = [r for r in rows if "skipped" not in r]
    assert len(rows) == 1 and rows[0]["backend"] == "reference" and rows[0]["rel_err"] < 1e-2
    assert rows[0]["copy_bandwidth_GBps"] > 0 and rows[0]["loop_overhead_s"] > 0
