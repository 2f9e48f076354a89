"""Pallas GPU kernel on the Triton backend (jax 0.10.x and 0.11.x; selected by Triton compiler params).

One ``pallas_call`` per packed matmul.  Grid ``(N / bn, cdiv(M, bm), splits)``: every program owns a
(bm, bn) output block and a 1/splits share of each segment's K *steps*.

* **Steps.**  A step is ``rows`` word rows of every shard of one K-tile; for a single-shard segment
  (1, 2, 4, 8 bits) the words of a step hold ``32 / bits`` contiguous K-pieces of ``rows`` codes
  each (the tile-planar slots), so one (rows, bn) int32 load feeds ``32 / bits`` tensor-core dots
  with the matching (bm, rows) activation slices; 3-bit segments (2 + 1-bit shards) take one step
  per tile.  Steps are the split-K unit, so small M still has enough programs to fill the GPU.
* **Dequantization** (``_dequant``): codes go into the MMA as the exact integers ``q - c`` (``c``
  the offset's integer part) by the magic-number trick, two weights per 32-bit instruction in
  inline PTX for f16/bf16 activations (``prmt``/``lop3``/``fma.rn.{f16,bf16}x2``); float32
  activations and 8-bit codes with bf16 use the 32-bit magic number.  Scales never touch the
  weights: per-channel scales and the offset remainder ``(o - c) * sum_k x`` are applied to the
  float32 accumulator in the epilogue, group scales to each piece's dot output.
* **No padding in memory.**  x is read unpadded with masked loads (rows >= M and columns past a
  segment's K read as 0); the (M, N) output is written with masked stores.  Split-K programs add
  their float32 partials into the output with atomics (the output starts as zeros), so small M
  is one kernel (plus the zero fill, a memset, and a cast when out_dtype is not float32).
* The int8-activation path (``x_scale``) keeps the integer MMA: codes enter as int8
  ``q - 2**(b-1)``; its row terms are computed outside and added by split 0 only.

Block sizes come from ``BLOCK_TABLE`` by M (the M <= 16 row measured on an H200, the others not), with
the shared memory checked against ``SMEM_LIMIT`` before launch (fewer stages, then shorter steps,
else a clear error).  Blocks are powers of two, as Triton requires.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels import _dequant as DQ
from pallas_kernels import _kernel_common as KC
from pallas_kernels import _layout as L
from pallas_kernels import _prep
from pallas_kernels.format import PackedWeight

NUM_SMS = 132              # H100 / H200 SXM multiprocessors
TARGET_PROGRAMS = 2 * NUM_SMS  # split-K until about two programs per SM
SMEM_LIMIT = 227 * 1024    # bytes of shared memory per block on H100 / H200 (sm_90)
MAX_STEP_ROWS = 64         # word rows per step by default

# (largest M, bm, bn, num_warps, num_stages, rows, splits); rows None: the default step rows;
# splits None: split-K to about TARGET_PROGRAMS programs.  The M <= 16 row was measured on an H200
# (experiments/results/kernels_gpu_h200_smallm.json: the best, or within 9 % of the best, of five
# configurations at K = N = 4096 and 8192, 2 and 4 bits, M = 1 and 16; 1.2-1.4x faster than the
# earlier (16, 16, 32, 4, 3) at K = N = 4096, 2.3-3.9x at 8192).  The other rows are unmeasured: the
# dispatch sends float x at M >= LARGE_M_CROSSOVER to dequantize + XLA, which was faster there.
BLOCK_TABLE = (
    (16, 16, 128, 4, 2, 32, 8),
    (32, 32, 64, 4, 3, None, None),
    (64, 64, 64, 4, 3, None, None),
    (256, 64, 128, 4, 3, None, None),
    (None, 128, 128, 8, 3, None, None),
)


@dataclasses.dataclass(frozen=True)
class TritonBlocks:
    """bm, bn: output block; splits: split-K factor; num_warps / num_stages: Triton launch params;
    rows: word rows per step (None: min(64, rows per slot, group size)); asm: inline-PTX
    dequantization on the GPU (False: the same magic numbers in plain jnp ops, for A/B timing)."""

    bm: int
    bn: int
    splits: int
    num_warps: int
    num_stages: int
    rows: int | None = None
    asm: bool = True


# --------------------------------------------------------------------------------------------
# Step plans
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Piece:
    """One K-piece of a step: K offset ``k_base + r0`` inside the tile, ``rows`` long; per shard
    (first word row inside the tile ``+ r0``, bit offset of its slot)."""

    k_base: int
    loads: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class _Plan:
    rows: int                 # K rows per piece (== word rows loaded per shard)
    steps_per_tile: int       # r0 = (step % steps_per_tile) * rows
    pieces: tuple[_Piece, ...]


def step_plan(bits: int, k_tile: int, group_size: int | None, max_rows: int | None) -> _Plan:
    sbs = L.shards(bits)
    cap = max_rows or MAX_STEP_ROWS
    if len(sbs) == 1:
        sb = sbs[0]
        r = k_tile * sb // 32
        p = min(x for x in (r, group_size, cap) if x is not None)
        pieces = tuple(_Piece(k_base=j * r, loads=((0, j * sb),)) for j in range(32 // sb))
        return _Plan(rows=p, steps_per_tile=r // p, pieces=pieces)
    tp = L.tile_pieces(bits, k_tile, group_size, cap)
    pieces = tuple(_Piece(k_base=pc.k0, loads=tuple((row0, slot * sb) for (row0, slot), sb in zip(pc.loads, sbs)))
                   for pc in tp)
    return _Plan(rows=tp[0].rows, steps_per_tile=1, pieces=pieces)


def _steps(packed: PackedWeight, i: int, plan: _Plan) -> int:
    return packed.k_padded(i) // packed.k_tile * plan.steps_per_tile


# --------------------------------------------------------------------------------------------
# Blocks, shared memory, support
# --------------------------------------------------------------------------------------------
def smem_bytes(packed: PackedWeight, blocks: TritonBlocks, x_dtype: Any) -> int:
    """Estimate of one program's shared memory: ``num_stages`` buffers of a step's loads (words
    of every shard, the x slices of every piece) plus one staged pair of dot operands and the
    epilogue tile.  Triton lays out shared memory itself, so this is an estimate that errs high."""
    xb = jnp.dtype(x_dtype).itemsize
    worst = 0
    for seg in packed.segments:
        plan = step_plan(seg.bits, packed.k_tile, packed.group_size, blocks.rows)
        loads = {(sh, row0) for pc in plan.pieces for sh, (row0, _) in enumerate(pc.loads)}
        words = len(loads) * plan.rows * blocks.bn * 4
        xs = len(plan.pieces) * blocks.bm * plan.rows * xb
        dot = 2 * (blocks.bm * plan.rows + plan.rows * blocks.bn) * max(xb, 2)
        if xb == 4:  # float32 x (tf32 dots): Triton kept every piece's B operand in shared memory
            dot += len(plan.pieces) * plan.rows * blocks.bn * 4  # (measured on an H200: 1-bit, 32 pieces)
        worst = max(worst, blocks.num_stages * (words + xs) + dot)
    return worst + blocks.bm * blocks.bn * 4


def choose_blocks(m: int, packed: PackedWeight, x_dtype: Any = jnp.bfloat16) -> TritonBlocks:
    """Blocks from ``BLOCK_TABLE`` by M (bn halved until it divides N_padded); the row's split-K
    (capped by the K-steps) or else about ``TARGET_PROGRAMS`` programs; shared memory fitted under
    ``SMEM_LIMIT`` by dropping pipeline stages, then halving the step rows."""
    for max_m, bm, bn, warps, stages, rows, splits in BLOCK_TABLE:
        if max_m is None or m <= max_m:
            break
    n_pad = packed.n_padded
    while bn > 16 and n_pad % bn:
        bn //= 2
    programs = (n_pad // bn) * -(-m // bm)
    max_steps = max(_steps(packed, i, step_plan(s.bits, packed.k_tile, packed.group_size, rows))
                    for i, s in enumerate(packed.segments))
    splits = max(1, min(max_steps, splits or -(-TARGET_PROGRAMS // programs)))
    blocks = TritonBlocks(bm=bm, bn=bn, splits=splits, num_warps=warps, num_stages=stages, rows=rows)
    return fit_smem(blocks, packed, x_dtype)


def fit_smem(blocks: TritonBlocks, packed: PackedWeight, x_dtype: Any) -> TritonBlocks:
    """The first of: the blocks as given, 2 stages, 2 stages with steps of 32 then 16 word rows,
    1 stage with 16-row steps, then the same with bm halved (down to 16), then all of that with bn
    halved, whose ``smem_bytes`` fits ``SMEM_LIMIT``; else ValueError."""
    rows0 = blocks.rows or MAX_STEP_ROWS
    stages0 = blocks.num_stages
    tries = [(stages0, blocks.rows), (min(stages0, 2), blocks.rows)]
    tries += [(min(stages0, 2), r) for r in (32, 16) if r < rows0]
    tries.append((1, 16 if rows0 > 16 else blocks.rows))
    b, bn = blocks, blocks.bn
    while bn >= 16 and packed.n_padded % bn == 0:
        bm = blocks.bm
        while bm >= 16:
            for stages, rows in tries:
                b = dataclasses.replace(blocks, bm=bm, bn=bn, num_stages=stages, rows=rows)
                if smem_bytes(packed, b, x_dtype) <= SMEM_LIMIT:
                    return b
            bm //= 2
        bn //= 2
    raise ValueError(f"Triton blocks {blocks} need ~{smem_bytes(packed, b, x_dtype)} bytes of shared "
                     f"memory, over the {SMEM_LIMIT}-byte limit even with 1 stage and 16-row steps: "
                     f"use smaller bm/bn")


def check_supported(packed: PackedWeight, blocks: TritonBlocks | None = None) -> None:
    """The Triton dot needs pieces of >= 16 K rows; blocks must be powers of two dividing N_padded."""
    for i, seg in enumerate(packed.segments):
        rows = step_plan(seg.bits, packed.k_tile, packed.group_size, blocks.rows if blocks else None).rows
        if rows < 16:
            raise ValueError(f"segment {i} ({seg.bits}-bit, k_tile={packed.k_tile}, group_size="
                             f"{packed.group_size}) unpacks into {rows}-row pieces; the Triton kernel "
                             f"needs >= 16: use a larger k_tile or group_size")
    if blocks is not None:
        for name in ("bm", "bn"):
            v = getattr(blocks, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"blocks.{name}={v} must be a power of two >= 16")
        if packed.n_padded % blocks.bn:
            raise ValueError(f"blocks.bn={blocks.bn} must divide N_padded={packed.n_padded}")
        if blocks.splits < 1:
            raise ValueError(f"blocks.splits={blocks.splits} must be >= 1")
        if blocks.rows is not None and (blocks.rows < 16 or blocks.rows & (blocks.rows - 1)):
            raise ValueError(f"blocks.rows={blocks.rows} must be None or a power of two >= 16")


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------
def triton_packed_matmul(x: jax.Array, packed: PackedWeight, *, x_scale: Any = None,
                         out_dtype: Any = None, blocks: TritonBlocks | None = None,
                         interpret: bool = False) -> jax.Array:
    """Packed matmul with the Pallas Triton kernel (``interpret=True`` runs it on CPU)."""
    from jax.experimental.pallas import triton as pltriton

    call = _prep.check_call(x, packed, x_scale, out_dtype)
    x = jnp.asarray(x)
    mode = call.mode
    w_dtype, acc_dtype = _prep.kernel_dtypes(mode, x.dtype)
    blocks = blocks or choose_blocks(call.m, packed, x.dtype)
    check_supported(packed, blocks)
    bm, bn, splits = blocks.bm, blocks.bn, blocks.splits
    m, n = call.m, packed.n
    n_pad = packed.n_padded
    segs = packed.segments
    n_seg = len(segs)
    gs = packed.group_size
    kt = packed.k_tile
    plans = [step_plan(s.bits, kt, gs, blocks.rows) for s in segs]
    n_steps = [_steps(packed, i, plans[i]) for i in range(n_seg)]
    use_asm = blocks.asm and not interpret
    precision = _prep.dot_precision(x.dtype)
    atomic = splits > 1

    if packed.input_perm is not None:  # mixed layers: one gather of x per call
        x = jnp.take(x, packed.input_perm, axis=1)
    kofs = [sum(s.k for s in segs[:i]) for i in range(n_seg)]
    kx = max(kofs[i] + packed.k_padded(i) for i in range(n_seg))

    args, specs = [x], [pl.BlockSpec((bm, kx), lambda j, i, s: (i, 0))]
    for seg in segs:
        for w in seg.words:
            specs.append(pl.BlockSpec((w.shape[0], bn), lambda j, i, s: (0, j)))
            args.append(w)
    for seg in segs:
        specs.append(pl.BlockSpec((seg.scales.shape[0], bn), lambda j, i, s: (0, j)))
        args.append(seg.scales)
    if mode == "int":
        corrs = _prep.row_corrections(_prep.split_segments(x, _no_perm(packed)), packed)
        for c in [jnp.reshape(x_scale, (m, 1)).astype(jnp.float32)] + corrs:
            specs.append(pl.BlockSpec((bm, 1), lambda j, i, s: (i, 0)))
            args.append(c)
    if atomic:
        specs.append(pl.BlockSpec((bm, bn), lambda j, i, s: (i, j)))
        args.append(jnp.zeros((m, n), jnp.float32))

    n_words = [len(s.words) for s in segs]

    def kernel(*refs):
        it = iter(refs)
        x_ref = next(it)
        w_refs = [[next(it) for _ in range(n_words[i])] for i in range(n_seg)]
        s_refs = [next(it) for _ in range(n_seg)]
        xs_ref = c_refs = None
        if mode == "int":
            xs_ref = next(it)
            c_refs = [next(it) for _ in range(n_seg)]
        if atomic:
            next(it)  # the zeros, aliased to the output
        o_ref = next(it)
        pj, pi, sid = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        row_ok = (pi * bm + jnp.arange(bm, dtype=jnp.int32))[:, None] < m

        def load_col(ref):  # (bm, 1) per-row values, rows >= M read as 0
            return pltriton.load(ref, mask=row_ok, other=0)

        accs = []
        for i, seg in enumerate(segs):
            plan = plans[i]
            sbs = L.shards(seg.bits)
            c = DQ.center(seg.offset)
            cor = seg.offset - c  # float mode: x.(q - o) = x.(q - c) - cor * sum(x)
            need_rs = mode == "float" and cor != 0
            p = plan.rows
            groups: dict = {}
            for pc in plan.pieces:  # pieces that read the same words share one dequant call
                groups.setdefault(tuple(r for r, _ in pc.loads), []).append(pc)

            def body(step, carry, i=i, seg=seg, plan=plan, sbs=sbs, c=c, cor=cor, need_rs=need_rs,
                     p=p, groups=groups):
                acc, rs = carry
                t = step // plan.steps_per_tile
                r0 = (step % plan.steps_per_tile) * p
                for rows0, pcs in groups.items():
                    words = [pltriton.load(
                        w_refs[i][sh].at[pl.ds(t * L.word_rows(kt, sbs[sh]) + row0 + r0, p), :],
                        eviction_policy="evict_first") for sh, row0 in enumerate(rows0)]
                    los = [tuple(lo for _, lo in pc.loads) for pc in pcs]
                    if mode == "int":
                        ops = [(DQ.codes(words, seg.bits, lo) - jnp.int32(_prep.int_center(seg.bits))
                                ).astype(jnp.int8) for lo in los]
                    elif DQ.fits16(seg.bits, w_dtype):
                        ops = DQ.pieces16([words] * len(pcs), seg.bits, los, c, w_dtype, use_asm)
                    else:
                        ops = [DQ.magic32(DQ.codes(words, seg.bits, lo), c).astype(w_dtype) for lo in los]
                    for pc, w in zip(pcs, ops):
                        k_loc = t * kt + pc.k_base + r0  # segment-local K of the piece's first row
                        cols = k_loc + jnp.arange(p, dtype=jnp.int32)
                        xp = pltriton.load(x_ref.at[:, pl.ds(kofs[i] + k_loc, p)],
                                           mask=row_ok & (cols[None, :] < seg.k), other=0)
                        d = jnp.dot(xp, w, preferred_element_type=acc_dtype, precision=precision)
                        if gs is None:
                            acc = acc + d
                            if need_rs:
                                rs = rs + jnp.sum(xp.astype(jnp.float32), axis=1, keepdims=True)
                        else:
                            g = t * (kt // gs) + (pc.k_base + r0) // gs
                            srow = s_refs[i][pl.ds(g, 1), :]
                            if need_rs:
                                d = d - cor * jnp.sum(xp.astype(jnp.float32), axis=1, keepdims=True)
                            acc = acc + d * srow
                return acc, rs

            acc0 = (jnp.zeros((bm, bn), acc_dtype), jnp.zeros((bm, 1), jnp.float32))
            per = -(-n_steps[i] // splits)
            lo = jnp.minimum(sid * per, n_steps[i])
            hi = jnp.minimum(lo + per, n_steps[i])
            acc, rs = jax.lax.fori_loop(lo, hi, body, acc0)
            if mode == "float" and gs is None and cor != 0:
                acc = acc - cor * rs
            accs.append(acc)

        scale_rows = [None if gs is not None else s_refs[i][...] for i in range(n_seg)]
        cs = None
        if mode == "int":  # the row terms belong to the total: add them in split 0 only
            first = (sid == 0).astype(jnp.float32)
            cs = [load_col(cr) * first for cr in c_refs]
        y = KC.epilogue(accs, scale_rows, mode, cs, load_col(xs_ref) if mode == "int" else None)
        ok = row_ok & ((pj * bn + jnp.arange(bn, dtype=jnp.int32))[None, :] < n)
        if atomic:
            idx = (slice(None), slice(None))
            if interpret:  # the interpreter has no masked atomics; its blocks are padded anyway
                pltriton.atomic_add(o_ref, idx, y)
            else:
                pltriton.atomic_add(o_ref, idx, y, mask=ok)
        else:
            pltriton.store(o_ref, y.astype(o_ref.dtype), mask=ok)

    out_dtype_k = jnp.float32 if atomic else call.out_dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Triton is deprecated in jax 0.11
        out = pl.pallas_call(
            kernel,
            grid=(n_pad // bn, -(-m // bm), splits),
            in_specs=specs,
            out_specs=pl.BlockSpec((bm, bn), lambda j, i, s: (i, j)),
            out_shape=jax.ShapeDtypeStruct((m, n), out_dtype_k),
            input_output_aliases={len(args) - 1: 0} if atomic else {},
            compiler_params=_compat.triton_compiler_params(blocks.num_warps, blocks.num_stages),
            interpret=interpret,
            name="packed_matmul_triton",
        )(*args)
    return out if out.dtype == call.out_dtype else out.astype(call.out_dtype)


def _no_perm(packed: PackedWeight) -> PackedWeight:
    return dataclasses.replace(packed, input_perm=None)
