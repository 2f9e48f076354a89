"""Pallas GPU kernel on the Triton backend (jax 0.10.x and 0.11.x; selected by Triton compiler params).

Grid ``(N / bn, M / bm, splits)``; every program owns a (bm, bn) output block and a 1/splits share
of each segment's K-tiles (split-K, used for small M so that enough programs fill the GPU; the
float32 partials are summed by XLA).  Inside, a ``fori_loop`` walks the tiles; per tile each
shard's words are read once (int32, packed along K), unpacked in registers with shifts and masks
into pieces of P >= 16 contiguous K rows, dequantized (grouped scales here) and cast to the
activation dtype, and each piece feeds a tensor-core ``dot`` with the matching (bm, P) activation
slice — so no in-register concatenation (Triton lowers only 2-way joins).  Accumulation is float32
(int32 for int8 activations); per-channel scales and the int8 path's row terms are applied in the
epilogue.  Blocks are powers of two, as Triton requires.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels import _kernel_common as KC
from pallas_kernels import _layout as L
from pallas_kernels import _prep
from pallas_kernels.format import PackedWeight

TARGET_PROGRAMS = 264  # ~2 waves of 132 SMs (H100 SXM); used to size split-K at small M


@dataclasses.dataclass(frozen=True)
class TritonBlocks:
    """bm, bn: output block; splits: split-K factor; num_warps / num_stages: Triton launch params."""

    bm: int
    bn: int
    splits: int
    num_warps: int
    num_stages: int


def choose_blocks(m: int, packed: PackedWeight) -> TritonBlocks:
    """Small M (<= 64, memory-bound): bm = 16..64, bn = 64, split-K until ~TARGET_PROGRAMS programs.
    Large M (compute-bound): bm = bn = 128, no split, 8 warps, 3 pipeline stages."""
    n_pad = packed.n_padded
    if m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        bn = 64
        programs = (n_pad // bn) * (L.round_up(m, bm) // bm)
        max_tiles = max(packed.k_padded(i) // packed.k_tile for i in range(len(packed.segments)))
        splits = max(1, min(max_tiles, -(-TARGET_PROGRAMS // programs)))
        return TritonBlocks(bm=bm, bn=bn, splits=splits, num_warps=4, num_stages=2)
    return TritonBlocks(bm=128, bn=128, splits=1, num_warps=8, num_stages=3)


def check_supported(packed: PackedWeight) -> None:
    """The Triton dot needs pieces of >= 16 K rows."""
    for i, seg in enumerate(packed.segments):
        rows = L.tile_pieces(seg.bits, packed.k_tile, packed.group_size)[0].rows
        if rows < 16:
            raise ValueError(f"segment {i} ({seg.bits}-bit, k_tile={packed.k_tile}, group_size="
                             f"{packed.group_size}) unpacks into {rows}-row pieces; the Triton kernel "
                             f"needs >= 16: use a larger k_tile or group_size")


def triton_packed_matmul(x: jax.Array, packed: PackedWeight, *, x_scale: Any = None,
                         out_dtype: Any = None, blocks: TritonBlocks | None = None,
                         interpret: bool = False) -> jax.Array:
    """Packed matmul with the Pallas Triton kernel (``interpret=True`` runs it on CPU)."""
    call = _prep.check_call(x, packed, x_scale, out_dtype)
    check_supported(packed)
    x = jnp.asarray(x)
    mode = call.mode
    w_dtype, acc_dtype = _prep.kernel_dtypes(mode, x.dtype)
    blocks = blocks or choose_blocks(call.m, packed)
    bm, bn, splits = blocks.bm, blocks.bn, blocks.splits
    m_pad = L.round_up(call.m, bm)
    n_pad = packed.n_padded
    segs = packed.segments
    n_seg = len(segs)
    gs = packed.group_size
    kt = packed.k_tile

    x_segs = _prep.split_segments(x, packed)
    corrs = _prep.row_corrections(x_segs, packed) if mode == "int" else []
    args, specs = [], []
    for i, xs in enumerate(x_segs):
        specs.append(pl.BlockSpec((bm, packed.k_padded(i)), lambda n, m, s: (m, 0)))
        args.append(_prep.pad_to(xs, m_pad, packed.k_padded(i)))
    for seg in segs:
        for w in seg.words:
            specs.append(pl.BlockSpec((w.shape[0], bn), lambda n, m, s: (0, n)))
            args.append(w)
    for seg in segs:
        specs.append(pl.BlockSpec((seg.scales.shape[0], bn), lambda n, m, s: (0, n)))
        args.append(seg.scales)
    if mode == "int":
        cols = [jnp.reshape(x_scale, (call.m, 1)).astype(jnp.float32)] + corrs
        for c in cols:
            specs.append(pl.BlockSpec((bm, 1), lambda n, m, s: (m, 0)))
            args.append(_prep.pad_to(c, m_pad, 1))

    tiles = [packed.k_padded(i) // kt for i in range(n_seg)]
    pieces = [L.tile_pieces(s.bits, kt, gs) for s in segs]
    n_words = [len(s.words) for s in segs]
    precision = _prep.dot_precision(x.dtype)

    def kernel(*refs):
        it = iter(refs)
        x_refs = [next(it) for _ in range(n_seg)]
        w_refs = [[next(it) for _ in range(n_words[i])] for i in range(n_seg)]
        s_refs = [next(it) for _ in range(n_seg)]
        xs_ref, c_refs = None, None
        if mode == "int":
            xs_ref = next(it)
            c_refs = [next(it) for _ in range(n_seg)]
        o_ref = next(it)
        sid = pl.program_id(2)

        accs = []
        for i, seg in enumerate(segs):
            sbs = L.shards(seg.bits)

            def body(t, acc, i=i, seg=seg, sbs=sbs):
                cache = {}

                def load(sh, row0, rows):
                    key = (sh, row0)
                    if key not in cache:
                        start = t * L.word_rows(kt, sbs[sh]) + row0
                        cache[key] = w_refs[i][sh][pl.ds(start, rows), :]
                    return cache[key]

                for pc in pieces[i]:
                    q = KC.piece_codes(load, seg.bits, pc)
                    srow = None if gs is None else s_refs[i][pl.ds(t * (kt // gs) + pc.group, 1), :]
                    w = KC.piece_operand(q, seg.bits, seg.offset, mode, srow).astype(w_dtype)
                    xp = x_refs[i][:, pl.ds(t * kt + pc.k0, pc.rows)]
                    acc = acc + jnp.dot(xp, w, preferred_element_type=acc_dtype, precision=precision)
                return acc

            acc0 = jnp.zeros((bm, bn), acc_dtype)
            if splits == 1:
                acc = jax.lax.fori_loop(0, tiles[i], body, acc0)
            else:
                per = -(-tiles[i] // splits)
                lo = jnp.minimum(sid * per, tiles[i])
                hi = jnp.minimum(lo + per, tiles[i])
                acc = jax.lax.fori_loop(lo, hi, body, acc0)
            accs.append(acc)

        rows = [None if gs is not None else s_refs[i][...] for i in range(n_seg)]
        cs = None
        if mode == "int":  # the row terms belong to the total: add them in split 0 only
            first = (sid == 0).astype(jnp.float32)
            cs = [c[...] * first for c in c_refs]
        y = KC.epilogue(accs, rows, mode, cs, xs_ref[...] if mode == "int" else None)
        o_ref[...] = y.astype(o_ref.dtype)

    if splits == 1:
        out_spec = pl.BlockSpec((bm, bn), lambda n, m, s: (m, n))
        out_shape = jax.ShapeDtypeStruct((m_pad, n_pad), call.out_dtype)
    else:
        out_spec = pl.BlockSpec((None, bm, bn), lambda n, m, s: (s, m, n))
        out_shape = jax.ShapeDtypeStruct((splits, m_pad, n_pad), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Triton is deprecated in jax 0.11
        out = pl.pallas_call(
            kernel,
            grid=(n_pad // bn, m_pad // bm, splits),
            in_specs=specs,
            out_specs=out_spec,
            out_shape=out_shape,
            compiler_params=_compat.triton_compiler_params(blocks.num_warps, blocks.num_stages),
            interpret=interpret,
            name="packed_matmul_triton",
        )(*args)
    if splits > 1:
        out = jnp.sum(out, axis=0).astype(call.out_dtype)
    return out[: call.m, : packed.n]
