"""The compiled kernels on a real NVIDIA GPU against float64 NumPy (skipped without one).

This is the part of the GPU session's check that needs no timing: the inline PTX dequantization,
the masked loads/stores and the split-K atomics only run for real here.  Run first on a device:

    pytest tests/pallas_kernels/test_on_device.py -q
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import dispatch
from pallas_kernels.gpu_triton import TritonBlocks, choose_blocks, triton_packed_matmul

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def _layer(npref, seed, bits, ks, n, group=None, perm=False):
    rng = np.random.default_rng(seed)
    codes, scales, offsets, p = npref.random_layer(rng, bits, ks, n, group, with_perm=perm)
    packed = pk.pack_mixed(codes, bits, scales, offsets=offsets, group_size=group, input_perm=p)
    return rng, packed, npref.mixed_weight(codes, bits, scales, offsets, group, p)


def _y64(x, w64):
    return np.asarray(x.astype(jnp.float32), np.float64) @ w64


@pytest.mark.parametrize("asm", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 5, 40, 300])
def test_triton_every_width_on_device(m, bits, dtype, asm, npref):
    rng, packed, w64 = _layer(npref, 10 * bits + m, [bits], [1000], 300)
    x = jnp.asarray(rng.standard_normal((m, 1000)), dtype)
    blocks = dataclasses.replace(choose_blocks(m, packed, dtype), asm=asm)
    y = jax.jit(lambda x, p: triton_packed_matmul(x, p, out_dtype=jnp.float32, blocks=blocks))(x, packed)
    assert npref.rel_err(y, _y64(x, w64)) < TOL[dtype]


@pytest.mark.parametrize("case", [
    dict(bits=[2, 8], ks=[3000, 1096], n=1000, m=16, perm=True),
    dict(bits=[4], ks=[4096], n=4096, m=1, group=128),
    dict(bits=[3, 4], ks=[1000, 700], n=640, m=77, group=32),
])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_layouts_on_device(case, splits, npref):
    c = dict(case)
    rng, packed, w64 = _layer(npref, 5, c["bits"], c["ks"], c["n"], c.get("group"), c.get("perm", False))
    x = jnp.asarray(rng.standard_normal((c["m"], sum(c["ks"]))), jnp.bfloat16)
    blocks = TritonBlocks(bm=16, bn=64, splits=splits, num_warps=4, num_stages=2)
    y = jax.jit(lambda x, p: triton_packed_matmul(x, p, blocks=blocks))(x, packed)
    assert y.dtype == jnp.bfloat16 and npref.rel_err(y, _y64(x, w64)) < 1e-2


def test_int8_path_on_device(npref):
    rng, packed, w64 = _layer(npref, 6, [4, 8], [700, 300], 200)
    xq, xs = pk.quantize_activations(jnp.asarray(rng.standard_normal((9, 1000)), jnp.float32))
    y = jax.jit(lambda x, s, p: pk.packed_matmul(x, p, x_scale=s))(xq, xs, packed)
    y64 = (np.asarray(xq, np.float64) * np.asarray(xs, np.float64)[:, None]) @ w64
    assert npref.rel_err(y, y64) < 1e-5


def test_large_m_dispatch_on_device(npref):
    m = dispatch.LARGE_M_CROSSOVER
    rng, packed, w64 = _layer(npref, 7, [4], [1024], 512)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    assert dispatch.plan("auto", m, packed).path == "xla_dequant"
    y = jax.jit(lambda x, p: pk.packed_matmul(x, p, out_dtype=jnp.float32))(x, packed)
    assert npref.rel_err(y, _y64(x, w64)) < 1e-2


@pytest.mark.parametrize("m", [1, 64, 130])
@pytest.mark.parametrize("bits", [4, 8])
def test_mosaic_gpu_on_device(m, bits, npref):
    if "H100" not in jax.devices()[0].device_kind and "H200" not in jax.devices()[0].device_kind:
        pytest.skip("the Mosaic GPU kernel needs Hopper (wgmma)")
    rng, packed, w64 = _layer(npref, 8, [bits], [1024], 256)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    y = jax.jit(lambda x, p: pk.packed_matmul(x, p, backend="mosaic_gpu", out_dtype=jnp.float32))(x, packed)
    assert npref.rel_err(y, _y64(x, w64)) < 1e-2
