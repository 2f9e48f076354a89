"""Mosaic TPU kernel for the packed matmul.

Grid ``(N / bn, M / bm, sum_s steps_s)`` ("nmk"): output blocks are "parallel", the last axis walks
the K-steps of segment 0, then of segment 1, ... and is "arbitrary" (sequential reduction).
With several M blocks the grid is ``(N / bn, sum_s steps_s, M / bm)`` ("nkm") where the (M, bn)
accumulators fit VMEM: each weight tile is dequantized once (at the first M block) into VMEM and
reused by every M block, instead of once per M block.  Each
segment has its own float32/int32 accumulator in VMEM scratch; a segment's BlockSpecs clamp
their K index outside its own steps, so Pallas does not re-fetch them while another segment runs.

Per step and segment: word blocks (kb * sb / 32, bn) int32 — packed along K, i.e. along
sublanes — are unpacked with shifts and masks into pieces (contiguous K-slices), dequantized in
float32 (grouped scales are applied here), concatenated along sublanes to a (kb, bn) tile, cast to
the activation dtype and fed to one MXU dot with the (bm, kb) activation block.  Per-channel scales,
the int8 path's row corrections and x scales are applied once, in the epilogue.
Block rules honoured: last two block dims multiples of (8, 128) or full (bm is a multiple of the
dtype's sublane count, bn of 128, kb of 512).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels import _kernel_common as KC
from pallas_kernels import _layout as L
from pallas_kernels import _prep
from pallas_kernels.format import PackedWeight

VMEM_BUDGET = 12 * 2 ** 20   # bytes of double-buffered blocks + temporaries we allow per step
MAX_KB = 2048                 # K rows per step (the unpack is fully unrolled)
MAX_PIECES = 128              # pieces per step, bounds the unrolled code size


NKM_VMEM_BUDGET = 8 * 2 ** 20  # bytes for the resident (M, bn) accumulators + output + weight tiles


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
    """bm, bn: output block; kb[s]: K rows per grid step of segment s; order: "nmk" (grid
    (N, M, K), one accumulator block) or "nkm" (grid (N, K, M): each weight tile is dequantized
    once, at the first M block, into VMEM and reused by the others; the (M, bn) accumulators and
    output column stay resident in VMEM)."""

    bm: int
    bn: int
    kb: tuple[int, ...]
    order: str = "nmk"


def _choose_kb(kp: int, bits: int, k_tile: int, group_size: int | None, bm: int, bn: int,
               x_bytes: int) -> int:
    """Largest multiple of k_tile dividing kp that fits VMEM, the unroll caps and the (8,128) rule."""
    tiles = kp // k_tile
    n_pieces = len(L.tile_pieces(bits, k_tile, group_size))
    best = None
    for t in range(1, tiles + 1):
        if tiles % t:
            continue
        kb = t * k_tile
        if group_size is not None and (kb // group_size) % 8 and kb != kp:
            continue
        vmem = 2 * (bm * kb * x_bytes + kb * bits * bn // 8) + kb * bn * 4 * 2
        if best is not None and (kb > MAX_KB or t * n_pieces > MAX_PIECES or vmem > VMEM_BUDGET):
            break
        best = kb
    return best


def nkm_vmem(m_pad: int, bn: int, kb: tuple[int, ...], n_seg: int, out_bytes: int = 4) -> int:
    """VMEM held across the M axis by the "nkm" order: f32/int32 accumulators, the double-buffered
    output column and one dequantized weight tile per segment (f32 upper bound)."""
    return m_pad * bn * (4 * n_seg + 2 * out_bytes) + sum(kb) * bn * 4


def choose_blocks(m: int, packed: PackedWeight, x_dtype: Any) -> TpuBlocks:
    """Blocks by shape: small M -> one M block (weights streamed and dequantized once); larger M ->
    bm = 256 and, where the (M, bn) accumulators fit ``NKM_VMEM_BUDGET``, the "nkm" grid order so
    each weight tile is still dequantized once per call; else "nmk" (once per M block)."""
    sub = _prep.sublane(x_dtype)
    bm = L.round_up(m, sub) if m <= 256 else 256
    n_pad = packed.n_padded
    x_bytes = jnp.dtype(x_dtype).itemsize
    n_seg = len(packed.segments)

    def kbs(bn):
        return tuple(_choose_kb(packed.k_padded(i), s.bits, packed.k_tile, packed.group_size, bm, bn,
                                x_bytes) for i, s in enumerate(packed.segments))

    bns = [b for b in (512, 256, 128) if n_pad % b == 0]
    if m > bm:
        m_pad = L.round_up(m, bm)
        for bn in bns:
            kb = kbs(bn)
            if nkm_vmem(m_pad, bn, kb, n_seg) <= NKM_VMEM_BUDGET:
                return TpuBlocks(bm=bm, bn=bn, kb=kb, order="nkm")
    return TpuBlocks(bm=bm, bn=bns[0], kb=kbs(bns[0]))


def _clamp(k, start: int, steps: int):
    return jnp.minimum(jnp.maximum(k - start, 0), steps - 1)


def tpu_packed_matmul(x: jax.Array, packed: PackedWeight, *, x_scale: Any = None, out_dtype: Any = None,
                      blocks: TpuBlocks | None = None, interpret: Any = False) -> jax.Array:
    """Packed matmul with the Mosaic TPU kernel.

    ``interpret=True`` runs it in the Pallas interpreter on CPU; a ``pltpu.InterpretParams`` runs
    the TPU-semantics interpreter (simulated VMEM/DMAs, out-of-bounds checks)."""
    call = _prep.check_call(x, packed, x_scale, out_dtype)
    x = jnp.asarray(x)
    mode = call.mode
    w_dtype, acc_dtype = _prep.kernel_dtypes(mode, x.dtype)
    blocks = blocks or choose_blocks(call.m, packed, x.dtype)
    if blocks.order not in ("nmk", "nkm"):
        raise ValueError(f"blocks.order={blocks.order!r} must be 'nmk' or 'nkm'")
    nkm = blocks.order == "nkm"
    bm, bn = blocks.bm, blocks.bn
    m_pad = L.round_up(call.m, bm)
    n_pad = packed.n_padded
    segs = packed.segments
    n_seg = len(segs)
    gs = packed.group_size
    kt = packed.k_tile

    x_segs = _prep.split_segments(x, packed)
    corrs = (_prep.row_corrections(x_segs, packed) if mode == "int"
             else _prep.float_corrections(x_segs, packed))
    has_corr = [c is not None for c in corrs]
    x_in = [_prep.pad_to(xs, m_pad, packed.k_padded(i)) for i, xs in enumerate(x_segs)]

    steps = [packed.k_padded(i) // blocks.kb[i] for i in range(n_seg)]
    starts = [sum(steps[:i]) for i in range(n_seg)]
    total = sum(steps)

    args, specs = [], []
    def spec(shape, f):  # f(n, m, k) -> block index, whatever the grid order
        if nkm:
            return pl.BlockSpec(shape, lambda n, k, m: f(n, m, k))
        return pl.BlockSpec(shape, lambda n, m, k: f(n, m, k))

    for i in range(n_seg):
        specs.append(spec((bm, blocks.kb[i]), lambda n, m, k, i=i: (m, _clamp(k, starts[i], steps[i]))))
        args.append(x_in[i])
    for i, seg in enumerate(segs):
        for w, sb in zip(seg.words, L.shards(seg.bits)):
            specs.append(spec((L.word_rows(blocks.kb[i], sb), bn),
                              lambda n, m, k, i=i: (_clamp(k, starts[i], steps[i]), n)))
            args.append(w)
    for i, seg in enumerate(segs):
        if gs is None:
            specs.append(spec((1, bn), lambda n, m, k: (0, n)))
        else:
            specs.append(spec((blocks.kb[i] // gs, bn),
                              lambda n, m, k, i=i: (_clamp(k, starts[i], steps[i]), n)))
        args.append(seg.scales)
    cols = []
    if mode == "int":
        cols.append(jnp.reshape(x_scale, (call.m, 1)).astype(jnp.float32))
    if any(has_corr):
        cols.append(jnp.concatenate([c if c is not None else jnp.zeros((call.m, 1), jnp.float32)
                                     for c in corrs], axis=1))
    for a in cols:
        specs.append(spec((bm, a.shape[1]), lambda n, m, k: (m, 0)))
        args.append(_prep.pad_to(a, m_pad, a.shape[1]))

    pieces = [L.tile_pieces(s.bits, kt, gs) for s in segs]
    n_words = [len(s.words) for s in segs]
    precision = _prep.dot_precision(x.dtype)

    def kernel(*refs):
        it = iter(refs)
        x_refs = [next(it) for _ in range(n_seg)]
        w_refs = [[next(it) for _ in range(n_words[i])] for i in range(n_seg)]
        s_refs = [next(it) for _ in range(n_seg)]
        xs_ref = corr_ref = None
        if mode == "int":
            xs_ref = next(it)
        if any(has_corr):
            corr_ref = next(it)
        o_ref = next(it)
        acc_refs = [next(it) for _ in range(n_seg)]
        wq_refs = [next(it) for _ in range(n_seg)] if nkm else None
        if nkm:
            k, m = pl.program_id(1), pl.program_id(2)
            rows = pl.ds(pl.multiple_of(m * bm, bm), bm)  # this M block's rows of the resident column
        else:
            m, k = pl.program_id(1), pl.program_id(2)
            rows = slice(None)

        @pl.when(k == 0)
        def _init():
            for a in acc_refs:
                a[rows, :] = jnp.zeros((bm, bn), a.dtype)

        def dequantized(i, seg):
            parts = []
            for t in range(blocks.kb[i] // kt):
                def load(sh, row0, nrows, t=t):
                    sb = L.shards(seg.bits)[sh]
                    return w_refs[i][sh][pl.ds(t * L.word_rows(kt, sb) + row0, nrows), :]
                for pc in pieces[i]:
                    q = KC.piece_codes(load, seg.bits, pc)
                    srow = None
                    if gs is not None:
                        srow = s_refs[i][pl.ds(t * (kt // gs) + pc.group, 1), :]
                    parts.append(KC.piece_operand(q, seg.bits, seg.offset, mode, srow))
            w = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
            return w.astype(w_dtype)

        for i in range(n_seg):
            seg = segs[i]

            @pl.when((k >= starts[i]) & (k < starts[i] + steps[i]))
            def _step(i=i, seg=seg):
                if nkm:
                    @pl.when(m == 0)  # dequantize each weight tile once per call
                    def _dq():
                        wq_refs[i][...] = dequantized(i, seg)
                    w = wq_refs[i][...]
                else:
                    w = dequantized(i, seg)
                acc_refs[i][rows, :] += jnp.dot(x_refs[i][...], w, preferred_element_type=acc_dtype,
                                                precision=precision)

        @pl.when(k == total - 1)
        def _fin():
            accs = [a[rows, :] for a in acc_refs]
            srows = [None if gs is not None else s_refs[i][...] for i in range(n_seg)]
            cs = [corr_ref[:, i:i + 1] if has_corr[i] else None for i in range(n_seg)]
            y = KC.epilogue(accs, srows, mode, cs, xs_ref[...] if mode == "int" else None)
            o_ref[rows, :] = y.astype(o_ref.dtype)

    if nkm:
        grid = (n_pad // bn, total, m_pad // bm)
        out_spec = pl.BlockSpec((m_pad, bn), lambda n, k, m: (0, n))
        scratch = ([_compat.tpu_vmem((m_pad, bn), acc_dtype) for _ in range(n_seg)]
                   + [_compat.tpu_vmem((blocks.kb[i], bn), w_dtype) for i in range(n_seg)])
        semantics = ("parallel", "arbitrary", "arbitrary")
    else:
        grid = (n_pad // bn, m_pad // bm, total)
        out_spec = pl.BlockSpec((bm, bn), lambda n, m, k: (m, n))
        scratch = [_compat.tpu_vmem((bm, bn), acc_dtype) for _ in range(n_seg)]
        semantics = ("parallel", "parallel", "arbitrary")
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), call.out_dtype),
        scratch_shapes=scratch,
        compiler_params=_compat.tpu_compiler_params(semantics),
        interpret=interpret,
        name="packed_matmul_tpu",
    )(*args)
    return out[: call.m, : packed.n]
