"""The packed low-bit weight format (version 1): ``pack``, ``unpack``, ``dequantize``, save/load.

A weight ``W`` of shape (K, N) (``y = x @ W``) is stored as unsigned integer *codes* ``q`` with a
per-segment *offset* ``o`` and float32 *scales* ``s``:

    W[k, n] = (q[k, n] - o) * s[g(k), n]          q in [0, 2**bits - 1],  2*o an integer in [0, 2*(2**bits - 1)]

``g(k) = 0`` for per-output-channel scales, ``g(k) = k // group_size`` for per-group scales along K.
K may be cut into *segments* of different bit widths (the two-level palette): the layer is then
``y = x[:, perm] @ concat(W_0, W_1, ...)``, i.e. ``x_lo @ W_lo + x_hi @ W_hi``, one object, one call.

Storage (see ``_layout`` for the bit order): each segment's codes are split into power-of-two bit
*shards* (3 bits = 2 + 1), each packed 32 // shard_bits codes per int32 word along K in
tile-planar order; K of each segment is zero-padded to a multiple of ``k_tile`` and N to a multiple
of ``n_tile``; padded codes are 0 and padded scales are 0 (kernels also zero-pad x, so padding adds
exactly nothing). No ``jnp.int4`` is involved anywhere.

``PackedWeight`` is a pytree (array leaves + static metadata incl. ``version``): jit over it, put it
in a parameter tree, or ``save``/``load`` it as ``.npz``.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _layout as L
from pallas_kernels._layout import FORMAT_VERSION, SUPPORTED_BITS, SUPPORTED_K_TILES, SUPPORTED_N_TILES


# --------------------------------------------------------------------------------------------
# The pytree structures
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PackedSegment:
    """One homogeneous-bit K-segment.

    words:  tuple of int32 arrays, one per shard, shape (k_padded * shard_bits / 32, n_padded).
    scales: float32 (G, n_padded); G = 1 (per output channel) or k_padded / group_size.
    bits, k (true rows), offset: static.
    """

    words: tuple[jax.Array, ...]
    scales: jax.Array
    bits: int
    k: int
    offset: float


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A packed (K, N) weight made of one or more K-segments (see module docstring).

    segments: the K-segments, in the order they consume (permuted) input channels.
    input_perm: int32 (K,) or None; the kernel reads ``x[:, input_perm]``.
    n: true N; k_tile, n_tile: padding / packing tile sizes; group_size: None = per-channel;
    version: format version, checked before any kernel runs.
    """

    segments: tuple[PackedSegment, ...]
    input_perm: jax.Array | None
    n: int
    k_tile: int
    n_tile: int
    group_size: int | None
    version: int = FORMAT_VERSION

    @property
    def k(self) -> int:
        """True K (sum of segment K)."""
        return sum(s.k for s in self.segments)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)

    @property
    def n_padded(self) -> int:
        return int(self.segments[0].scales.shape[1])

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(s.bits for s in self.segments)

    def k_padded(self, i: int) -> int:
        """Padded K of segment ``i``."""
        return L.round_up(self.segments[i].k, self.k_tile)

    @property
    def nbytes(self) -> int:
        """Bytes of all stored arrays (words, scales, permutation)."""
        leaves = jax.tree_util.tree_leaves(self)
        return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves))


jax.tree_util.register_dataclass(
    PackedSegment, data_fields=["words", "scales"], meta_fields=["bits", "k", "offset"])
jax.tree_util.register_dataclass(
    PackedWeight, data_fields=["segments", "input_perm"],
    meta_fields=["n", "k_tile", "n_tile", "group_size", "version"])


class UnpackedSegment(NamedTuple):
    """What ``unpack`` returns per segment: codes (k, n) uint8, scales (n,) or (G, n) float32."""

    codes: jax.Array
    scales: jax.Array
    bits: int
    offset: float


# --------------------------------------------------------------------------------------------
# Validation helpers (host side, before anything is traced)
# --------------------------------------------------------------------------------------------
def check_bits(bits: Any, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"{name}={bits!r} is not supported; allowed bit widths are {SUPPORTED_BITS}")
    return int(bits)


def default_offset(bits: int) -> float:
    """Midpoint offset (2**bits - 1) / 2: a symmetric grid, e.g. 1 bit -> {-0.5, +0.5} * s."""
    return (2 ** bits - 1) / 2


def _check_offset(offset: Any, bits: int, name: str) -> float:
    qmax = 2 ** bits - 1
    try:
        o = float(offset)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(offset).__name__}") from None
    if not (0.0 <= o <= qmax) or (2 * o) != int(2 * o):
        raise ValueError(f"{name}={offset!r} must be an integer or half-integer in [0, {qmax}] "
                         f"for {bits}-bit codes")
    return o


def _check_tile(value: Any, allowed: tuple[int, ...], name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values are {allowed}")
    return int(value)


def _check_group_size(group_size: Any, k_tile: int) -> int | None:
    if group_size is None:
        return None
    ok = (isinstance(group_size, (int, np.integer)) and not isinstance(group_size, bool)
          and L.MIN_GROUP_SIZE <= int(group_size) <= k_tile and (int(group_size) & (int(group_size) - 1)) == 0)
    if not ok:
        raise ValueError(f"group_size={group_size!r} must be None (per-output-channel scales) or a power "
                         f"of two in [{L.MIN_GROUP_SIZE}, k_tile={k_tile}]")
    return int(group_size)


def _as_numpy(a: Any, name: str) -> np.ndarray:
    if isinstance(a, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete array: pack runs on the host, outside jax.jit")
    return np.asarray(a)


def _check_codes(codes: Any, bits: int, name: str) -> np.ndarray:
    c = _as_numpy(codes, name)
    if c.ndim != 2:
        raise ValueError(f"{name} must be 2-D (K, N), got shape {c.shape}")
    if c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {c.shape}")
    if not (np.issubdtype(c.dtype, np.integer) or c.dtype == np.bool_):
        raise TypeError(f"{name} must have an integer dtype (unsigned codes), got {c.dtype}")
    lo, hi = int(c.min()), int(c.max())
    qmax = 2 ** bits - 1
    if lo < 0 or hi > qmax:
        raise ValueError(f"{name} has codes in [{lo}, {hi}], out of range for {bits}-bit codes: "
                         f"allowed [0, {qmax}]")
    return c.astype(np.uint32)


def _check_scales(scales: Any, k: int, n: int, group_size: int | None, name: str) -> np.ndarray:
    s = _as_numpy(scales, name)
    if not np.issubdtype(s.dtype, np.floating):
        raise TypeError(f"{name} must be a float array, got dtype {s.dtype}")
    if group_size is None:
        if s.shape != (n,):
            raise ValueError(f"{name} must have shape (N,)=({n},) for per-channel scales, got {s.shape}")
        s = s[None, :]
    else:
        g = -(-k // group_size)
        if s.shape != (g, n):
            raise ValueError(f"{name} must have shape (ceil(K/group_size), N)=({g}, {n}) with "
                             f"group_size={group_size}, got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} must be finite")
    return s.astype(np.float32)


# --------------------------------------------------------------------------------------------
# pack / unpack
# --------------------------------------------------------------------------------------------
def _pack_shard(q: np.ndarray, shard_bits: int, k_tile: int) -> np.ndarray:
    """(Kp, Np) uint32 shard codes -> (Kp*sb/32, Np) int32 words, tile-planar along K."""
    kp, np_ = q.shape
    p = L.slots(shard_bits)
    r = k_tile // p
    q = q.reshape(kp // k_tile, p, r, np_)
    shifts = (np.arange(p, dtype=np.uint32) * shard_bits)[None, :, None, None]
    words = np.bitwise_or.reduce(q << shifts, axis=1)  # (T, R, Np), disjoint bit fields
    return words.reshape(-1, np_).astype(np.uint32).view(np.int32)


def _pack_segment(codes: np.ndarray, bits: int, scales: np.ndarray, offset: float, n_pad: int,
                  k_tile: int, group_size: int | None) -> PackedSegment:
    k, n = codes.shape
    kp = L.round_up(k, k_tile)
    q = np.zeros((kp, n_pad), np.uint32)
    q[:k, :n] = codes
    words = []
    for sb, shift in zip(L.shards(bits), L.shard_shifts(bits)):
        words.append(jnp.asarray(_pack_shard((q >> shift) & ((1 << sb) - 1), sb, k_tile)))
    g_pad = 1 if group_size is None else kp // group_size
    s = np.zeros((g_pad, n_pad), np.float32)
    s[: scales.shape[0], :n] = scales
    return PackedSegment(words=tuple(words), scales=jnp.asarray(s), bits=bits, k=k, offset=offset)


def pack_mixed(codes: Sequence[Any], bits: Sequence[int], scales: Sequence[Any], *,
               offsets: Sequence[float] | None = None, group_size: int | None = None,
               input_perm: Any = None, k_tile: int = 512, n_tile: int = 128,
               fold_perm: bool = True) -> PackedWeight:
    """Pack K-segments of different bit widths into one ``PackedWeight`` (host side, NumPy).

    y = x[:, input_perm] @ concat_s(W_s),   W_s[k, n] = (codes[s][k, n] - offsets[s]) * scales[s][g(k), n]

    codes[s]: integer (K_s, N) in [0, 2**bits[s] - 1]; scales[s]: (N,) or (ceil(K_s/group_size), N);
    offsets[s]: default (2**bits - 1)/2; input_perm: a permutation of range(sum K_s) or None.
    fold_perm: a single segment with per-channel scales stores its rows in input-channel order
    (row ``input_perm[i]`` holds ``codes[0][i]``) and ``input_perm=None``: the same y, and no
    gather of x at run time.  (Several segments keep the permutation: one gather of x per call.)
    """
    if isinstance(codes, (np.ndarray, jax.Array)) or not isinstance(codes, Sequence):
        raise TypeError("codes must be a sequence of 2-D code arrays (one per segment); "
                        "use pack() for a single segment")
    if not (isinstance(bits, Sequence) and isinstance(scales, Sequence)) or not (
            len(codes) == len(bits) == len(scales)) or len(codes) == 0:
        raise ValueError("codes, bits and scales must be non-empty sequences of equal length "
                         "(one entry per segment)")
    if offsets is not None and (not isinstance(offsets, Sequence) or len(offsets) != len(codes)):
        raise ValueError("offsets must be None or a sequence with one offset per segment")
    k_tile = _check_tile(k_tile, SUPPORTED_K_TILES, "k_tile")
    n_tile = _check_tile(n_tile, SUPPORTED_N_TILES, "n_tile")
    group_size = _check_group_size(group_size, k_tile)
    if not isinstance(fold_perm, bool):
        raise TypeError(f"fold_perm must be a bool, got {type(fold_perm).__name__}")

    b = [check_bits(bi, f"bits[{i}]") for i, bi in enumerate(bits)]
    c = [_check_codes(ci, bi, f"codes[{i}]") for i, (ci, bi) in enumerate(zip(codes, b))]
    n = c[0].shape[1]
    for i, ci in enumerate(c):
        if ci.shape[1] != n:
            raise ValueError(f"codes[{i}] has N={ci.shape[1]} but codes[0] has N={n}: all segments "
                             f"must share N")
    s = [_check_scales(si, ci.shape[0], n, group_size, f"scales[{i}]")
         for i, (si, ci) in enumerate(zip(scales, c))]
    o = [default_offset(bi) if offsets is None or offsets[i] is None
         else _check_offset(offsets[i], bi, f"offsets[{i}]") for i, bi in enumerate(b)]

    k_total = sum(ci.shape[0] for ci in c)
    perm = None
    if input_perm is not None:
        p = _as_numpy(input_perm, "input_perm")
        if p.shape != (k_total,) or not np.issubdtype(p.dtype, np.integer) or not np.array_equal(
                np.sort(p), np.arange(k_total)):
            raise ValueError(f"input_perm must be a permutation of range(K)=range({k_total}) "
                             f"as a 1-D integer array")
        perm = jnp.asarray(p.astype(np.int32))
        if fold_perm and len(c) == 1 and group_size is None:
            folded = np.empty_like(c[0])
            folded[p] = c[0]          # x[:, p] @ W == x @ W' with W'[p[i]] = W[i]
            c, perm = [folded], None

    n_pad = L.round_up(n, n_tile)
    segs = tuple(_pack_segment(ci, bi, si, oi, n_pad, k_tile, group_size)
                 for ci, bi, si, oi in zip(c, b, s, o))
    return PackedWeight(segments=segs, input_perm=perm, n=n, k_tile=k_tile, n_tile=n_tile,
                        group_size=group_size)


def pack(w_codes: Any, bits: int, scales: Any, *, offset: float | None = None,
         group_size: int | None = None, k_tile: int = 512, n_tile: int = 128) -> PackedWeight:
    """Pack one (K, N) matrix of ``bits``-bit unsigned codes (a single segment).

    W[k, n] = (w_codes[k, n] - offset) * scales[g(k), n];  scales (N,) per channel or
    (ceil(K/group_size), N) per group.  See ``pack_mixed`` for two-level (mixed-bit) layers.
    """
    return pack_mixed([w_codes], [bits], [scales], offsets=[offset], group_size=group_size,
                      k_tile=k_tile, n_tile=n_tile)


def unpack_words(words: jax.Array, shard_bits: int, k_tile: int) -> jax.Array:
    """(Kp*sb/32, Np) int32 words -> (Kp, Np) int32 shard codes (inverse of the planar packing)."""
    p = L.slots(shard_bits)
    r = k_tile // p
    rows, n = words.shape
    w = words.reshape(rows // r, 1, r, n)
    shifts = (jnp.arange(p, dtype=jnp.int32) * shard_bits).reshape(1, p, 1, 1)
    q = jax.lax.shift_right_logical(w, shifts) & ((1 << shard_bits) - 1)
    return q.reshape(rows * p, n)


def segment_codes(seg: PackedSegment, k_tile: int) -> jax.Array:
    """Padded (Kp, Np) int32 codes of a segment, rebuilt from its shards."""
    q = None
    for w, sb, shift in zip(seg.words, L.shards(seg.bits), L.shard_shifts(seg.bits)):
        part = unpack_words(w, sb, k_tile) << shift
        q = part if q is None else q | part
    return q


def check_packed(packed: Any, name: str = "packed") -> PackedWeight:
    """Type and version check of a PackedWeight (raises TypeError / ValueError)."""
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"{name} must be a pallas_kernels.PackedWeight (from pack/pack_mixed/load), "
                        f"got {type(packed).__name__}")
    if packed.version != FORMAT_VERSION:
        raise ValueError(f"{name} has packed-format version {packed.version!r}; this pallas_kernels "
                         f"reads version {FORMAT_VERSION} only: re-pack the weights")
    if not packed.segments:
        raise ValueError(f"{name} has no segments")
    n_pad = L.round_up(packed.n, packed.n_tile)
    for i, seg in enumerate(packed.segments):
        where = f"{name}.segments[{i}]"
        check_bits(seg.bits, f"{where}.bits")
        if len(seg.words) != len(L.shards(seg.bits)):
            raise ValueError(f"{where} has {len(seg.words)} word arrays; {seg.bits}-bit "
                             f"segments have {len(L.shards(seg.bits))}")
        kp = L.round_up(seg.k, packed.k_tile)
        for j, (w, sb) in enumerate(zip(seg.words, L.shards(seg.bits))):
            want = (L.word_rows(kp, sb), n_pad)
            if tuple(w.shape) != want or w.dtype != jnp.int32:
                raise ValueError(f"{where}.words[{j}] is {w.dtype}{tuple(w.shape)}; the format needs "
                                 f"int32{want}")
        g = 1 if packed.group_size is None else kp // packed.group_size
        if tuple(seg.scales.shape) != (g, n_pad) or seg.scales.dtype != jnp.float32:
            raise ValueError(f"{where}.scales is {seg.scales.dtype}{tuple(seg.scales.shape)}; the "
                             f"format needs float32{(g, n_pad)}")
    return packed


def unpack(packed: PackedWeight) -> tuple[UnpackedSegment, ...]:
    """Exact inverse of ``pack``/``pack_mixed``: per segment, the (K_s, N) uint8 codes and scales."""
    check_packed(packed)
    out = []
    for seg in packed.segments:
        q = segment_codes(seg, packed.k_tile)[: seg.k, : packed.n].astype(jnp.uint8)
        if packed.group_size is None:
            s = seg.scales[0, : packed.n]
        else:
            s = seg.scales[: -(-seg.k // packed.group_size), : packed.n]
        out.append(UnpackedSegment(codes=q, scales=s, bits=seg.bits, offset=seg.offset))
    return tuple(out)


def dequantize(packed: PackedWeight) -> jax.Array:
    """The dense float32 (K, N) weight W with ``x @ W == packed_matmul(x, packed)`` (exact math)."""
    check_packed(packed)
    rows = []
    for seg in packed.segments:
        q = segment_codes(seg, packed.k_tile)[: seg.k, : packed.n].astype(jnp.float32)
        if packed.group_size is None:
            s = seg.scales[:, : packed.n]
        else:
            s = jnp.repeat(seg.scales[:, : packed.n], packed.group_size, axis=0)[: seg.k]
        rows.append((q - seg.offset) * s)
    w = jnp.concatenate(rows, axis=0)
    if packed.input_perm is not None:
        w = jnp.zeros_like(w).at[packed.input_perm].set(w)
    return w


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------
def to_state_dict(packed: PackedWeight) -> dict[str, np.ndarray]:
    """Flat dict of NumPy arrays (incl. a JSON ``meta`` entry) that ``from_state_dict`` reads back."""
    check_packed(packed)
    meta = {"version": packed.version, "n": packed.n, "k_tile": packed.k_tile, "n_tile": packed.n_tile,
            "group_size": packed.group_size, "has_perm": packed.input_perm is not None,
            "segments": [{"bits": s.bits, "k": s.k, "offset": s.offset} for s in packed.segments]}
    state = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for i, seg in enumerate(packed.segments):
        for j, w in enumerate(seg.words):
            state[f"seg{i}/words{j}"] = np.asarray(w)
        state[f"seg{i}/scales"] = np.asarray(seg.scales)
    if packed.input_perm is not None:
        state["input_perm"] = np.asarray(packed.input_perm)
    return state


def from_state_dict(state: dict[str, Any]) -> PackedWeight:
    """Rebuild a ``PackedWeight`` from ``to_state_dict``; refuses other format versions."""
    if "meta" not in state:
        raise ValueError("state has no 'meta' entry: not a pallas_kernels packed weight")
    meta = json.loads(np.asarray(state["meta"], dtype=np.uint8).tobytes().decode())
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"packed weight has format version {meta.get('version')!r}; this "
                         f"pallas_kernels reads version {FORMAT_VERSION} only: re-pack the weights")
    segs = []
    for i, sm in enumerate(meta["segments"]):
        words = tuple(jnp.asarray(state[f"seg{i}/words{j}"]) for j in range(len(L.shards(sm["bits"]))))
        segs.append(PackedSegment(words=words, scales=jnp.asarray(state[f"seg{i}/scales"]),
                                  bits=sm["bits"], k=sm["k"], offset=sm["offset"]))
    perm = jnp.asarray(state["input_perm"]) if meta["has_perm"] else None
    return PackedWeight(segments=tuple(segs), input_perm=perm, n=meta["n"], k_tile=meta["k_tile"],
                        n_tile=meta["n_tile"], group_size=meta["group_size"], version=meta["version"])


def save(path: str, packed: PackedWeight) -> None:
    """Write ``packed`` to an ``.npz`` file."""
    np.savez(path, **to_state_dict(packed))


def load(path: str) -> PackedWeight:
    """Read a packed weight written by ``save`` (checks the format version)."""
    with np.load(path) as f:
        return from_state_dict({k: f[k] for k in f.files})
