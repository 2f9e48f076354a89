"""Every kernel, run by the Pallas interpreter on CPU, against the jnp reference and float64 NumPy.

Fresh random data (codes over the full range, random signed scales and offsets, random x), awkward
shapes (M, K, N not multiples of 8/128), all bit widths, one and two segments in both orders,
per-channel and grouped scales, float and int8 activations, several grid blocks and split-K.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.gpu_triton import TritonBlocks, triton_packed_matmul
from pallas_kernels.tpu import TpuBlocks, tpu_packed_matmul

KERNELS = {"tpu": tpu_packed_matmul, "triton": triton_packed_matmul}
# float64 NumPy vs kernel, norm-relative: f32 math is exact up to accumulation order; bf16/f16 x
# are exact inputs, weights are exact per channel, grouped weights are rounded to x.dtype.
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
# Interpret mode is compile-bound on CPU: compile the tests' jitted calls without LLVM optimization.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_run(f, *args):
    """jax.jit(f)(*args), compiled with FAST_COMPILE (numerics are unaffected)."""
    return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _layer(seed, bits, ks, n, group_size=None, perm=True, npref=None):
    rng = np.random.default_rng(seed)
    codes, scales, offsets, p = npref.random_layer(rng, bits, ks, n, group_size, with_perm=perm)
    packed = pk.pack_mixed(codes, bits, scales, offsets=offsets, group_size=group_size, input_perm=p)
    w64 = npref.mixed_weight(codes, bits, scales, offsets, group_size, p)
    return rng, packed, w64


def _check(kernel, x, packed, w64, npref, x_scale=None, blocks=None, tol=None):
    y = jit_run(lambda x, p, s: kernel(x, p, x_scale=s, out_dtype=jnp.float32, blocks=blocks,
                                       interpret=True), x, packed, x_scale)
    y_ref = pk.reference_packed_matmul(x, packed, x_scale=x_scale, out_dtype=jnp.float32)
    xs = 1.0 if x_scale is None else np.asarray(x_scale, np.float64)[:, None]
    y64 = (np.asarray(x.astype(jnp.float32), np.float64) * xs) @ w64
    assert y.shape == y64.shape and y.dtype == jnp.float32
    assert np.std(y64) > 0 and np.all(np.isfinite(np.asarray(y)))
    assert npref.rel_err(y, y_ref) < 1e-5, "kernel and jnp reference disagree"
    assert npref.rel_err(y, y64) < (tol or TOL[x.dtype.type]), "kernel and float64 NumPy disagree"
    return y


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_single_segment_every_bit_width(backend, bits, npref):
    rng, packed, w64 = _layer(100 + bits, [bits], [700], 200, perm=False, npref=npref)
    x = jnp.asarray(rng.standard_normal((5, 700)), jnp.bfloat16)
    _check(KERNELS[backend], x, packed, w64, npref)


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("bits,dtype", [((2, 8), jnp.float32), ((8, 2), jnp.float16), ((3, 4), jnp.bfloat16)])
def test_two_segments_both_orders(backend, bits, dtype, npref):
    """One packed object, one call: y = x_lo @ W_lo + x_hi @ W_hi, with an input permutation."""
    rng, packed, w64 = _layer(7, list(bits), [600, 333], 130, npref=npref)
    x = jnp.asarray(rng.standard_normal((3, 933)), dtype)
    _check(KERNELS[backend], x, packed, w64, npref)


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_grouped_scales_mixed(backend, npref):
    rng, packed, w64 = _layer(11, [3, 8], [300, 200], 129, group_size=32, npref=npref)
    x = jnp.asarray(rng.standard_normal((9, 500)), jnp.float32)
    _check(KERNELS[backend], x, packed, w64, npref)


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("bits", [(4,), (2, 8)])
def test_int8_activation_path(backend, bits, npref):
    """x_q int8 with per-row scales; codes enter the MMA as int8, accumulation is int32."""
    ks = [640] if len(bits) == 1 else [520, 300]
    rng, packed, w64 = _layer(21, list(bits), ks, 150, npref=npref)
    xq, xs = pk.quantize_activations(jnp.asarray(rng.standard_normal((6, sum(ks))), jnp.float32))
    assert xq.dtype == jnp.int8 and int(jnp.max(jnp.abs(xq))) == 127
    _check(KERNELS[backend], xq, packed, w64, npref, x_scale=xs, tol=1e-6)


def test_tpu_many_grid_steps(npref):
    """Several N, M and K blocks per segment (K steps smaller than the segment)."""
    rng, packed, w64 = _layer(31, [4, 2], [1100, 1024], 300, npref=npref)
    x = jnp.asarray(rng.standard_normal((40, 2124)), jnp.float32)
    _check(tpu_packed_matmul, x, packed, w64, npref, blocks=TpuBlocks(bm=16, bn=128, kb=(512, 512)))


def test_tpu_grouped_multi_step_bf16_output(npref):
    rng, packed, w64 = _layer(32, [8], [1536], 256, group_size=64, npref=npref)
    x = jnp.asarray(rng.standard_normal((20, 1536)), jnp.bfloat16)
    y = jit_run(lambda x, p: tpu_packed_matmul(x, p, blocks=TpuBlocks(bm=16, bn=128, kb=(512,)),
                                               interpret=True), x, packed)
    y64 = np.asarray(x.astype(jnp.float32), np.float64) @ w64
    assert y.dtype == jnp.bfloat16 and npref.rel_err(y, y64) < 1e-2


@pytest.mark.parametrize("mode", ["float", "int"])
def test_triton_split_k_and_many_blocks(mode, npref):
    """Split-K partials (summed outside) and the int path's row terms counted exactly once."""
    rng, packed, w64 = _layer(41, [8, 1], [1500, 1030], 140, npref=npref)
    x = jnp.asarray(rng.standard_normal((20, 2530)), jnp.float32)
    xs = None
    if mode == "int":
        x, xs = pk.quantize_activations(x)
    blocks = TritonBlocks(bm=16, bn=64, splits=3, num_warps=4, num_stages=2)
    _check(triton_packed_matmul, x, packed, w64, npref, x_scale=xs, blocks=blocks,
           tol=2e-6 if mode == "float" else 1e-6)


def test_kernels_under_jit_match(npref):
    rng, packed, w64 = _layer(51, [4], [520], 130, npref=npref)
    x = jnp.asarray(rng.standard_normal((4, 520)), jnp.float32)
    y64 = np.asarray(x, np.float64) @ w64
    for backend in ("triton", "tpu"):
        y = jax.jit(lambda x, p: pk.packed_matmul(x, p, backend=backend, interpret=True))(x, packed)
        assert npref.rel_err(y, y64) < 2e-6, backend


@pytest.mark.parametrize("bits,dtype,group", [((4,), jnp.bfloat16, None), ((8, 4), jnp.float16, 64)])
def test_mosaic_gpu_kernel_in_the_gpu_interpreter(bits, dtype, group, npref):
    """Hopper wgmma kernel, run by the Mosaic GPU interpreter (single-block grids only)."""
    from pallas_kernels.gpu_mosaic import MosaicBlocks, mosaic_gpu_packed_matmul
    ks = [1000] if len(bits) == 1 else [520, 600]
    rng, packed, w64 = _layer(61, list(bits), ks, 100, group_size=group, npref=npref)
    x = jnp.asarray(rng.standard_normal((13, sum(ks))), dtype)
    _check(mosaic_gpu_packed_matmul, x, packed, w64, npref, blocks=MosaicBlocks(bn=128, stages=1))


def test_mosaic_gpu_interpreter_refuses_multi_block_grids(npref):
    from pallas_kernels.gpu_mosaic import mosaic_gpu_packed_matmul
    _, packed, _ = _layer(62, [4], [512], 300, npref=npref)
    with pytest.raises(ValueError, match="single-block grids only"):
        mosaic_gpu_packed_matmul(jnp.ones((100, 512), jnp.bfloat16), packed, interpret=True)


def test_tpu_kernel_under_the_tpu_semantics_interpreter(npref):
    """pltpu.InterpretParams simulates TPU memories and DMAs; out-of-bounds block reads raise."""
    from jax.experimental.pallas import tpu as pltpu
    rng, packed, w64 = _layer(71, [2, 8], [600, 300], 200, npref=npref)
    x = jnp.asarray(rng.standard_normal((20, 900)), jnp.float32)
    params = pltpu.InterpretParams(out_of_bounds_reads="raise")
    y = tpu_packed_matmul(x, packed, interpret=params, blocks=TpuBlocks(bm=8, bn=128, kb=(512, 512)))
    assert npref.rel_err(y, np.asarray(x, np.float64) @ w64) < 2e-6
