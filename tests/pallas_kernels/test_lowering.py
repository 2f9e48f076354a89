"""Every kernel lowers for its real platform on this CPU machine (jax.export, no device needed).

platforms=["tpu"] runs the Mosaic TPU lowering ((8,128) block rules, supported ops);
platforms=["cuda"] with Triton compiler params runs the Pallas Triton lowering (power-of-2 shapes,
supported ops). The export must contain the backend's kernel call.
"""
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import tpu
from pallas_kernels.lowering import abstract_packed, export_kernel, lowers

BACKENDS = ["tpu", "triton"]


def _x(m, k, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct((m, k), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 16, 128, 4096])
def test_benchmark_shapes_lower(backend, bits, m):
    """The shapes experiments/bench_kernels.py times (K = N = 4096), with the default blocks."""
    assert lowers(backend, _x(m, 4096), abstract_packed([bits], [4096], 4096))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(bits=[2, 8], ks=[3000, 1096], n=8192, m=16),                    # two-level palette
    dict(bits=[8, 1], ks=[700, 1500], n=1000, m=300, perm=True),         # other order, awkward
    dict(bits=[4], ks=[8192], n=8192, m=1, group_size=128),              # grouped scales
    dict(bits=[3, 4], ks=[1000, 700], n=640, m=77, group_size=32),
    dict(bits=[4], ks=[4096], n=4096, m=64, dtype=jnp.float32),
    dict(bits=[2], ks=[4096], n=4096, m=2048, dtype=jnp.float16),
    dict(bits=[4], ks=[4096], n=4096, m=16, k_tile=2048, n_tile=512),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k in ("bits", "m", "group_size")))
def test_layouts_and_dtypes_lower(backend, case):
    c = dict(case)
    dtype, m = c.pop("dtype", jnp.bfloat16), c.pop("m")
    p = abstract_packed(c.pop("bits"), c.pop("ks"), c.pop("n"), **c)
    assert lowers(backend, _x(m, p.k, dtype), p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,m", [([4], 16), ([2, 8], 4096), ([1], 1)])
def test_int8_path_lowers(backend, bits, m):
    ks = [4096] if len(bits) == 1 else [3072, 1024]
    p = abstract_packed(bits, ks, 4096)
    assert lowers(backend, _x(m, 4096, jnp.int8), p, jax.ShapeDtypeStruct((m,), jnp.float32))


def test_tpu_lowering_enforces_block_rules():
    """The export is a real check: a block that breaks the (8,128) rule is refused."""
    p = abstract_packed([4], [1024], 256)
    with pytest.raises(Exception, match="divisible by 8 and 128"):
        export_kernel("tpu", _x(12, 1024), p, blocks=tpu.TpuBlocks(bm=4, bn=128, kb=(512,)))


# Mosaic GPU (Hopper wgmma, opt-in): 4- and 8-bit segments at k_tile=512, bf16/f16 activations.
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 16, 128, 4096])
def test_mosaic_gpu_benchmark_shapes_lower(bits, m):
    assert lowers("mosaic_gpu", _x(m, 4096), abstract_packed([bits], [4096], 4096))


@pytest.mark.parametrize("case", [
    dict(bits=[4, 8], ks=[3000, 1096], n=8192, m=16, dtype=jnp.float16),
    dict(bits=[8], ks=[700], n=300, m=77, group_size=64, perm=True),
    dict(bits=[2], ks=[4096], n=4096, m=1, k_tile=1024),
], ids=["two-level-f16", "grouped-awkward", "2bit-ktile1024"])
def test_mosaic_gpu_layouts_lower(case):
    c = dict(case)
    dtype, m = c.pop("dtype", jnp.bfloat16), c.pop("m")
    p = abstract_packed(c.pop("bits"), c.pop("ks"), c.pop("n"), **c)
    assert lowers("mosaic_gpu", _x(m, p.k, dtype), p)


def test_mosaic_gpu_refuses_what_it_does_not_cover():
    with pytest.raises(ValueError, match="needs >= 64-row unpack pieces.*backend='triton'"):
        export_kernel("mosaic_gpu", _x(16, 4096), abstract_packed([1], [4096], 4096))
    with pytest.raises(ValueError, match="bfloat16/float16 activations"):
        export_kernel("mosaic_gpu", _x(16, 4096, jnp.float32), abstract_packed([4], [4096], 4096))
