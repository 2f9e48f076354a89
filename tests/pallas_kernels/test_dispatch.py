"""Dispatch by platform, the CPU path, activation quantization and storage footprint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import gpu_triton, tpu
from pallas_kernels.lowering import abstract_packed


@pytest.mark.parametrize("platform,interpret,want", [
    ("tpu", False, "tpu"), ("gpu", False, "triton"), ("cpu", False, "reference"),
    ("cpu", True, "tpu"), ("rocm", False, "reference"), ("tpu", True, "tpu")])
def test_auto_backend_by_platform(platform, interpret, want):
    assert pk.resolve_backend("auto", interpret, platform) == want


def test_forced_backends():
    assert pk.resolve_backend("triton", False, "gpu") == "triton"
    assert pk.resolve_backend("triton", True, "cpu") == "triton"
    assert pk.resolve_backend("reference", False, "tpu") == "reference"
    assert pk.resolve_backend("mosaic_gpu", False, "gpu") == "mosaic_gpu"


def test_cpu_default_is_the_reference_and_matches_numpy(npref):
    rng = np.random.default_rng(5)
    codes, scales, offsets, perm = npref.random_layer(rng, [2, 4], [100, 37], 21, with_perm=True)
    p = pk.pack_mixed(codes, [2, 4], scales, offsets=offsets, input_perm=perm)
    x = jnp.asarray(rng.standard_normal((7, 137)), jnp.float32)
    y = jax.jit(pk.packed_matmul)(x, p)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(pk.reference_packed_matmul)(x, p)))
    w = npref.mixed_weight(codes, [2, 4], scales, offsets, None, perm)
    assert npref.rel_err(y, np.asarray(x, np.float64) @ w) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_reference_half_precision_and_output_dtype(dtype, npref):
    rng = np.random.default_rng(6)
    codes, scales, offsets, _ = npref.random_layer(rng, [3], [300], 50, group_size=64)
    p = pk.pack(codes[0], 3, scales[0], offset=offsets[0], group_size=64)
    x = jnp.asarray(rng.standard_normal((4, 300)), dtype)
    y = pk.reference_packed_matmul(x, p)
    assert y.dtype == dtype
    w = npref.weight(codes[0], 3, scales[0], offsets[0], 64)
    assert npref.rel_err(y, np.asarray(x.astype(jnp.float32), np.float64) @ w) < 1e-2
    assert pk.reference_packed_matmul(x, p, out_dtype=jnp.float32).dtype == jnp.float32


def test_quantize_activations_matches_numpy():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 33)).astype(np.float32)
    x[2] = 0.0
    xq, s = pk.quantize_activations(jnp.asarray(x))
    amax = np.abs(x).max(axis=1)
    s_np = np.where(amax > 0, amax / 127, 1.0)
    np.testing.assert_allclose(np.asarray(s), s_np, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(xq), np.clip(np.round(x / s_np[:, None]), -127, 127))
    assert np.max(np.abs(np.asarray(xq) * s_np[:, None] - x)) <= s_np.max() / 2 + 1e-6


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_footprint_is_bits_over_16_of_bf16(bits):
    p = abstract_packed([bits], [4096], 4096)
    ratio = 4096 * 4096 * 2 / p.nbytes
    assert 16 / bits * 0.99 < ratio <= 16 / bits


def test_block_choices_respect_backend_rules():
    for m in (1, 7, 16, 33, 100, 128, 1000, 4096):
        for bits, ks, n in (([4], [4096], 4096), ([2, 8], [1500, 700], 1000)):
            p = abstract_packed(bits, ks, n)
            b = tpu.choose_blocks(m, p, jnp.bfloat16)
            assert b.bm % 16 == 0 and b.bn % 128 == 0 and p.n_padded % b.bn == 0
            assert all(p.k_padded(i) % kb == 0 and kb % 512 == 0 for i, kb in enumerate(b.kb))
            t = gpu_triton.choose_blocks(m, p)
            for v in (t.bm, t.bn):
                assert v >= 16 and v & (v - 1) == 0
            assert p.n_padded % t.bn == 0 and t.splits >= 1
            assert gpu_triton.smem_bytes(p, t, jnp.bfloat16) <= gpu_triton.SMEM_LIMIT
            # split-K fills the GPU: about TARGET_PROGRAMS programs unless K runs out of steps
            programs = (p.n_padded // t.bn) * -(-m // t.bm)
            if t.splits > 1 and m > 16:
                assert programs * (t.splits - 1) < gpu_triton.TARGET_PROGRAMS
            if m <= 16:  # the row measured on an H200: fixed split-K, capped by the K-steps
                assert (t.bm, t.bn, t.num_warps, t.num_stages, t.rows) == (16, 128, 4, 2, 32)
                steps = max(p.k_padded(i) // p.k_tile * (p.k_tile * min(s.bits, 8) // 32 // 32 or 1)
                            for i, s in enumerate(p.segments))
                assert t.splits == min(8, steps) or len(p.segments) > 1
