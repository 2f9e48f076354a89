"""Packed format: exact pack/unpack inverses, bit positions from the spec, dequantize, pytree, save/load."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pallas_kernels as pk

BITS = st.sampled_from([1, 2, 3, 4, 8])
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(bits=BITS, k=st.integers(1, 1100), n=st.integers(1, 300), seed=st.integers(0, 2 ** 31 - 1),
       k_tile=st.sampled_from([512, 1024]), n_tile=st.sampled_from([128, 256]),
       group=st.sampled_from([None, 16, 128]))
def test_pack_unpack_roundtrip(bits, k, n, seed, k_tile, n_tile, group, npref):
    rng = np.random.default_rng(seed)
    codes, scales, offsets, _ = npref.random_layer(rng, [bits], [k], n, group)
    p = pk.pack(codes[0], bits, scales[0], offset=offsets[0], group_size=group, k_tile=k_tile,
                n_tile=n_tile)
    (u,) = pk.unpack(p)
    np.testing.assert_array_equal(np.asarray(u.codes), codes[0])
    np.testing.assert_array_equal(np.asarray(u.scales), scales[0])
    assert (u.bits, u.offset) == (bits, offsets[0])
    # and the other way round: packing what unpack returned gives back identical arrays
    p2 = pk.pack(np.asarray(u.codes), u.bits, np.asarray(u.scales), offset=u.offset, group_size=group,
                 k_tile=k_tile, n_tile=n_tile)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(p2)


@SETTINGS
@given(bits=BITS, k=st.integers(1, 1500), n=st.integers(1, 200), seed=st.integers(0, 2 ** 31 - 1),
       k_tile=st.sampled_from([512, 1024, 2048]))
def test_word_bit_positions_follow_the_spec(bits, k, n, seed, k_tile, npref):
    """Every code's bits sit where the documented tile-planar layout says, padding is zero."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2 ** bits, size=(k, n))
    p = pk.pack(q, bits, np.ones(n, np.float32), k_tile=k_tile)
    (seg,) = p.segments
    kp, np_ = -(-k // k_tile) * k_tile, -(-n // 128) * 128
    kk, nn = np.meshgrid(np.arange(kp), np.arange(np_), indexing="ij")
    qp = np.zeros((kp, np_), np.int64)
    qp[:k, :n] = q
    shift = 0
    for words, sb in zip(seg.words, npref.shards[bits]):
        assert words.dtype == jnp.int32 and words.shape == (kp * sb // 32, np_)
        got = npref.word_bits(words, kk, nn, sb, k_tile)
        np.testing.assert_array_equal(got, (qp >> shift) & ((1 << sb) - 1))
        shift += sb


def test_two_segment_roundtrip_and_dequantize(npref):
    rng = np.random.default_rng(7)
    bits, ks, n = [2, 8], [333, 129], 77
    codes, scales, offsets, perm = npref.random_layer(rng, bits, ks, n, group_size=32, with_perm=True)
    p = pk.pack_mixed(codes, bits, scales, offsets=offsets, group_size=32, input_perm=perm)
    assert p.shape == (sum(ks), n) and p.bits == (2, 8) and len(p.segments) == 2
    for u, c, s, b, o in zip(pk.unpack(p), codes, scales, bits, offsets):
        np.testing.assert_array_equal(np.asarray(u.codes), c)
        np.testing.assert_array_equal(np.asarray(u.scales), s)
        assert (u.bits, u.offset) == (b, o)
    want = npref.mixed_weight(codes, bits, scales, offsets, 32, perm)
    np.testing.assert_allclose(np.asarray(pk.dequantize(p)), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_dequantize_matches_numpy_per_channel(bits, npref):
    rng = np.random.default_rng(bits)
    codes, scales, offsets, _ = npref.random_layer(rng, [bits], [517], 131)
    p = pk.pack(codes[0], bits, scales[0], offset=offsets[0])
    want = npref.weight(codes[0], bits, scales[0], offsets[0])
    np.testing.assert_allclose(np.asarray(pk.dequantize(p)), want, rtol=1e-6, atol=1e-6)


def test_default_offset_is_the_midpoint():
    p = pk.pack(np.array([[0, 1]]), 1, np.array([2.0, 2.0], np.float32))
    np.testing.assert_array_equal(np.asarray(pk.dequantize(p)), [[-1.0, 1.0]])
    assert pk.default_offset(4) == 7.5


def test_storage_size_and_padding_metadata():
    k, n = 1000, 300
    p = pk.pack(np.zeros((k, n), np.int32) + 3, 4, np.ones(n, np.float32))
    assert p.k_padded(0) == 1024 and p.n_padded == 384 and (p.k, p.n) == (k, n)
    assert p.nbytes == 1024 * 384 // 2 + 384 * 4
    p3 = pk.pack(np.zeros((1024, 384), np.int32), 3, np.ones(384, np.float32))
    assert p3.nbytes == 1024 * 384 * 3 // 8 + 384 * 4  # 3 bits per weight, no rounding up to 4


def test_packed_weight_is_a_pytree_usable_under_jit(npref):
    rng = np.random.default_rng(3)
    codes, scales, offsets, perm = npref.random_layer(rng, [4, 8], [100, 60], 50, with_perm=True)
    p = pk.pack_mixed(codes, [4, 8], scales, offsets=offsets, input_perm=perm)
    leaves, tree = jax.tree_util.tree_flatten(p)
    assert all(isinstance(a, jax.Array) for a in leaves) and len(leaves) == 2 + 2 + 1
    p2 = jax.tree_util.tree_unflatten(tree, leaves)
    w = jax.jit(pk.dequantize)(p2)
    np.testing.assert_allclose(np.asarray(w), npref.mixed_weight(codes, [4, 8], scales, offsets, None, perm),
                               rtol=1e-6, atol=1e-6)


def test_save_load_roundtrip(tmp_path, npref):
    rng = np.random.default_rng(11)
    codes, scales, offsets, perm = npref.random_layer(rng, [3, 4], [70, 90], 33, group_size=16,
                                                      with_perm=True)
    p = pk.pack_mixed(codes, [3, 4], scales, offsets=offsets, group_size=16, input_perm=perm)
    path = str(tmp_path / "w.npz")
    pk.save(path, p)
    q = pk.load(path)
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(q)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 32])
def test_quantize_weight_then_pack_is_within_half_a_step(bits, group):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((203, 37)) * rng.uniform(0.1, 3.0, size=37)
    w[:, 5] = 0.0  # a dead channel dequantizes to exactly zero
    qz = pk.quantize_weight(w, bits, group_size=group)
    assert qz.codes.dtype == np.uint8 and qz.codes.max() <= 2 ** bits - 1
    p = pk.pack(qz.codes, bits, qz.scales, offset=qz.offset, group_size=group)
    w_hat = np.asarray(pk.dequantize(p), np.float64)
    g = 203 if group is None else group
    step = np.repeat(np.atleast_2d(qz.scales.astype(np.float64)), g, axis=0)[:203]
    assert np.all(np.abs(w_hat - w) <= step / 2 * (1 + 1e-6) + 1e-7)
    assert np.all(w_hat[:, 5] == 0.0)
    # the extreme of every channel is represented exactly (absmax scaling)
    idx = np.abs(w).argmax(axis=0)
    if group is None:
        np.testing.assert_allclose(np.abs(w_hat[idx, np.arange(37)]), np.abs(w[idx, np.arange(37)]),
                                   rtol=1e-6)
