"""Bad input fails at the public boundary with a clear error, before any kernel is launched."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.gpu_triton import triton_packed_matmul
from pallas_kernels.tpu import tpu_packed_matmul

ALL_PATHS = [
    lambda x, p, **kw: pk.packed_matmul(x, p, **kw),
    lambda x, p, **kw: pk.reference_packed_matmul(x, p, **kw),
    lambda x, p, **kw: tpu_packed_matmul(x, p, interpret=True, **kw),
    lambda x, p, **kw: triton_packed_matmul(x, p, interpret=True, **kw),
]
PATH_IDS = ["dispatch", "reference", "tpu", "triton"]


@pytest.fixture
def packed():
    rng = np.random.default_rng(0)
    return pk.pack(rng.integers(0, 16, (40, 24)), 4, rng.uniform(0.5, 1, 24).astype(np.float32))


@pytest.mark.parametrize("bits", [0, 5, 6, 7, 16, 4.0, "4", True])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=r"bits.*not supported.*\(1, 2, 3, 4, 8\)"):
        pk.pack(np.zeros((8, 8), np.int32), bits, np.ones(8, np.float32))


@pytest.mark.parametrize("bits,bad", [(1, 2), (2, 4), (3, 8), (4, 16), (8, 256), (4, -1)])
def test_codes_out_of_range(bits, bad):
    codes = np.zeros((9, 5), np.int32)
    codes[3, 2] = bad
    with pytest.raises(ValueError, match=rf"out of range for {bits}-bit codes: allowed \[0, {2 ** bits - 1}\]"):
        pk.pack(codes, bits, np.ones(5, np.float32))


def test_codes_must_be_integer_and_2d():
    with pytest.raises(TypeError, match="integer dtype"):
        pk.pack(np.zeros((4, 4), np.float32), 4, np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"2-D \(K, N\)"):
        pk.pack(np.zeros((4, 4, 2), np.int32), 4, np.ones(4, np.float32))


@pytest.mark.parametrize("kwargs,match", [
    (dict(scales=np.ones(5, np.float32)), r"shape \(N,\)=\(4,\)"),
    (dict(scales=np.ones(4, np.float32), group_size=16), r"shape \(ceil\(K/group_size\), N\)"),
    (dict(scales=np.array([1, np.nan, 1, 1], np.float32)), "finite"),
    (dict(scales=np.ones(4, np.int32)), "float array"),
    (dict(scales=np.ones(4, np.float32), group_size=24), "power of two"),
    (dict(scales=np.ones(4, np.float32), k_tile=256), r"k_tile=256 is not supported"),
    (dict(scales=np.ones(4, np.float32), n_tile=64), r"n_tile=64 is not supported"),
    (dict(scales=np.ones(4, np.float32), offset=7.25), "integer or half-integer"),
    (dict(scales=np.ones(4, np.float32), offset=16), r"\[0, 15\]"),
])
def test_bad_pack_arguments(kwargs, match):
    scales = kwargs.pop("scales")
    with pytest.raises((ValueError, TypeError), match=match):
        pk.pack(np.zeros((8, 4), np.int32), 4, scales, **kwargs)


def test_bad_pack_mixed_arguments():
    c = [np.zeros((8, 4), np.int32), np.zeros((8, 5), np.int32)]
    s = [np.ones(4, np.float32), np.ones(5, np.float32)]
    with pytest.raises(ValueError, match="all segments must share N"):
        pk.pack_mixed(c, [2, 8], s)
    with pytest.raises(ValueError, match="equal length"):
        pk.pack_mixed(c[:1], [2, 8], s[:1])
    with pytest.raises(TypeError, match="sequence of 2-D code arrays"):
        pk.pack_mixed(c[0], [2], s[:1])
    with pytest.raises(ValueError, match=r"permutation of range\(K\)=range\(8\)"):
        pk.pack_mixed(c[:1], [2], s[:1], input_perm=np.array([0, 1, 2, 3, 4, 5, 6, 6]))


@pytest.mark.parametrize("path", ALL_PATHS, ids=PATH_IDS)
def test_mismatched_k(path, packed):
    with pytest.raises(ValueError, match=r"x has K=41 columns but the packed weight has K=40"):
        path(jnp.ones((3, 41), jnp.float32), packed)


@pytest.mark.parametrize("path", ALL_PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [(40,), (2, 3, 40)])
def test_non_2d_x(path, packed, shape):
    with pytest.raises(ValueError, match=r"x must be 2-D \(M, K\)"):
        path(jnp.ones(shape, jnp.float32), packed)


@pytest.mark.parametrize("path", ALL_PATHS, ids=PATH_IDS)
def test_incompatible_format_version(path, packed):
    old = dataclasses.replace(packed, version=0)
    with pytest.raises(ValueError, match="format version 0.*reads version 1 only"):
        path(jnp.ones((2, 40), jnp.float32), old)


def test_version_checked_on_load(tmp_path, packed):
    state = pk.to_state_dict(packed)
    state["meta"] = np.frombuffer(bytes(state["meta"]).replace(b'"version": 1', b'"version": 2'),
                                  np.uint8)
    np.savez(tmp_path / "old.npz", **state)
    with pytest.raises(ValueError, match="format version 2"):
        pk.load(str(tmp_path / "old.npz"))


@pytest.mark.parametrize("path", ALL_PATHS, ids=PATH_IDS)
def test_bad_x_dtype_and_scales(path, packed):
    with pytest.raises(TypeError, match="x dtype int32 is not supported"):
        path(jnp.ones((2, 40), jnp.int32), packed)
    with pytest.raises(ValueError, match="pass x_scale"):
        path(jnp.ones((2, 40), jnp.int8), packed)
    with pytest.raises(ValueError, match=r"x_scale must have shape \(M,\)=\(2,\)"):
        path(jnp.ones((2, 40), jnp.int8), packed, x_scale=jnp.ones((3,)))
    with pytest.raises(ValueError, match="only used with int8 x"):
        path(jnp.ones((2, 40), jnp.float32), packed, x_scale=jnp.ones((2,)))
    with pytest.raises(TypeError, match="out_dtype"):
        path(jnp.ones((2, 40), jnp.float32), packed, out_dtype=jnp.int32)


def test_not_a_packed_weight_and_tampered_shapes(packed):
    with pytest.raises(TypeError, match="must be a pallas_kernels.PackedWeight"):
        pk.packed_matmul(jnp.ones((2, 40)), {"words": 1})
    seg = dataclasses.replace(packed.segments[0], words=(packed.segments[0].words[0][:-8],))
    bad = dataclasses.replace(packed, segments=(seg,))
    with pytest.raises(ValueError, match=r"words\[0\] is int32\(56, 128\); the format needs int32\(64, 128\)"):
        pk.packed_matmul(jnp.ones((2, 40)), bad)


def test_int_path_needs_per_channel_scales():
    p = pk.pack(np.zeros((40, 8), np.int32), 4, np.ones((3, 8), np.float32), group_size=16)
    with pytest.raises(ValueError, match="int8 integer path needs per-output-channel scales"):
        pk.packed_matmul(jnp.ones((2, 40), jnp.int8), p, x_scale=jnp.ones(2))


def test_backend_choice_errors(packed):
    x = jnp.ones((2, 40), jnp.float32)
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        pk.packed_matmul(x, packed, backend="cuda")
    with pytest.raises(ValueError, match="needs a TPU device.*interpret=True"):
        pk.packed_matmul(x, packed, backend="tpu")
    with pytest.raises(ValueError, match="needs a GPU device"):
        pk.packed_matmul(x, packed, backend="triton")
