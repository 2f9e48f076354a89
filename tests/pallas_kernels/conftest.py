"""Independent NumPy references for the packed-GEMM tests (float64, written from the format spec).

Nothing here calls pallas_kernels: these are the oracles the package is checked against.
"""
import types

import numpy as np
import pytest

SHARDS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}


def np_weight(codes, bits, scales, offset=None, group_size=None):
    """W = (q - o) * s[g(k)] in float64; o defaults to the midpoint (2**bits - 1) / 2."""
    q = np.asarray(codes, np.float64)
    o = (2 ** bits - 1) / 2 if offset is None else offset
    s = np.asarray(scales, np.float64)
    if group_size is None:
        return (q - o) * s[None, :]
    g = np.arange(q.shape[0]) // group_size
    return (q - o) * s[g, :]


def np_mixed_weight(codes, bits, scales, offsets=None, group_size=None, perm=None):
    """Dense (K, N) float64 weight of a segmented layer, rows in the caller's channel order."""
    offsets = offsets or [None] * len(codes)
    w = np.concatenate([np_weight(c, b, s, o, group_size)
                        for c, b, s, o in zip(codes, bits, scales, offsets)], axis=0)
    if perm is not None:
        dense = np.zeros_like(w)
        dense[np.asarray(perm)] = w
        return dense
    return w


def np_word_bits(words, k, n, shard_bits, k_tile):
    """Read the shard code of element (k, n) out of int32 words, straight from the spec:
    tile t = k // k_tile, R = k_tile * sb / 32, slot j = (k % k_tile) // R, row t*R + (k % k_tile) % R."""
    w = np.asarray(words).view(np.uint32)
    r_rows = k_tile * shard_bits // 32
    t, kl = k // k_tile, k % k_tile
    j, r = kl // r_rows, kl % r_rows
    return (w[t * r_rows + r, n] >> np.uint32(j * shard_bits)) & np.uint32((1 << shard_bits) - 1)


def random_layer(rng, bits, ks, n, group_size=None, with_perm=False):
    """Random codes spanning the full range, random non-trivial scales and offsets."""
    codes, scales, offsets = [], [], []
    for b, k in zip(bits, ks):
        c = rng.integers(0, 2 ** b, size=(k, n))
        c.flat[0], c.flat[-1] = 0, 2 ** b - 1  # both ends of the range appear
        codes.append(c)
        g = 1 if group_size is None else -(-k // group_size)
        s = rng.uniform(0.25, 2.0, size=(g, n)) * rng.choice([-1.0, 1.0], size=(g, n))
        scales.append((s[0] if group_size is None else s).astype(np.float32))
        offsets.append(float(rng.integers(0, 2 * (2 ** b - 1) + 1)) / 2)
    perm = rng.permutation(sum(ks)) if with_perm else None
    return codes, scales, offsets, perm


def rel_err(a, b):
    """max |a - b| / max |b| (norm-relative, robust to near-zero entries)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture
def npref():
    return types.SimpleNamespace(weight=np_weight, mixed_weight=np_mixed_weight, word_bits=np_word_bits,
                                 random_layer=random_layer, rel_err=rel_err, shards=SHARDS)
