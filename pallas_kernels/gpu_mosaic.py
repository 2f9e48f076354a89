"""Pallas Mosaic GPU kernel (Hopper, ``wgmma``): opt-in ``backend="mosaic_gpu"``.

Mosaic GPU is the default Pallas GPU backend (jax >= 0.9, incl. 0.10.x and 0.11.x); a generic
``jnp.dot`` kernel does not lower there, so this kernel is written with the ``plgpu`` API in
warpgroup semantics: ``plgpu.kernel`` over a (M / 64, N / bn) grid, one warpgroup per block, and
per packed segment a ``plgpu.emit_pipeline`` over its K-tiles that streams the activation tile
(64, k_tile) (TMA, swizzled) and the shard words (rows, bn) into SMEM.  Each 64-row piece is
unpacked in registers (shifts, masks), dequantized (grouped scales here) and stored as bf16/f16
into a 2-slot SMEM ring; ``wgmma`` multiplies it with the matching 64-column slice of the
activation tile into a float32 register accumulator per segment, one MMA in flight.  Per-channel
scales are applied in the epilogue from SMEM.

Scope (checked before launch, with a clear error): bf16/f16 activations (weight-only), pieces of
>= 64 rows, i.e. 4- and 8-bit segments at k_tile=512 (2-bit needs k_tile>=1024, 1/3-bit 2048,
and their (64, k_tile) activation tiles do not fit SMEM), group_size None or >= 64.  Everything
else: use backend="triton".  Validated on one H200 (jax 0.11.2: tests/pallas_kernels/test_on_device.py,
M = 1, 64, 130 at 4 and 8 bits, against float64 NumPy); there it was 0.42-0.66x of bf16 jnp.dot at
M <= 16 and 0.21-0.22x at M = 4096, slower than the Triton kernel (README).  Without a GPU,
correctness is checked with the Mosaic GPU interpreter on single-block grids and the lowering with
jax.export.
"""
from __future__ import annotations

import dataclasses
import inspect
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

BM = 64                 # one warpgroup's wgmma M
PIECE = 64              # K rows per wgmma (swizzle-width multiple, WGMMA-layout rows)
SMEM_LIMIT = 227 * 1024  # bytes of dynamic shared memory per block on H100
SWIZZLE = 128


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """bn: output columns per block; stages: pipeline depth (max_concurrent_steps)."""

    bn: int = 64
    stages: int = 2


def smem_bytes(packed: PackedWeight, bn: int, stages: int, x_bytes: int, out_bytes: int) -> int:
    """Peak SMEM of one block: the largest segment pipeline + wdq ring + scales + output tile."""
    kt = packed.k_tile
    per_seg = []
    for seg in packed.segments:
        words = sum(L.word_rows(kt, sb) * bn * 4 for sb in L.shards(seg.bits))
        scales = 0 if packed.group_size is None else (kt // packed.group_size) * bn * 4
        per_seg.append(stages * (BM * kt * x_bytes + words + scales))
    ring = 2 * PIECE * bn * x_bytes
    epi = len(packed.segments) * bn * 4 + BM * bn * out_bytes
    return max(per_seg) + ring + epi + 1024  # + barriers and alignment slack


def choose_blocks(packed: PackedWeight, x_dtype: Any, out_dtype: Any) -> MosaicBlocks:
    """Widest bn in (128, 64) whose SMEM fits; 2 pipeline stages."""
    xb, ob = jnp.dtype(x_dtype).itemsize, jnp.dtype(out_dtype).itemsize
    for bn in (128, 64):
        if packed.n_padded % bn == 0 and smem_bytes(packed, bn, 2, xb, ob) <= SMEM_LIMIT:
            return MosaicBlocks(bn=bn, stages=2)
    return MosaicBlocks(bn=64, stages=1)


def check_supported(packed: PackedWeight, mode: str, x_dtype: Any, out_dtype: Any,
                    blocks: MosaicBlocks) -> None:
    """Raise ValueError for what this kernel does not cover (see module docstring)."""
    if mode != "float" or jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"backend='mosaic_gpu' takes bfloat16/float16 activations (weight-only); got "
                         f"{jnp.dtype(x_dtype)}: use backend='triton' for float32 x or the int8 path")
    for i, seg in enumerate(packed.segments):
        rows = L.tile_pieces(seg.bits, packed.k_tile, packed.group_size, PIECE)[0].rows
        if rows < PIECE:
            raise ValueError(f"backend='mosaic_gpu' needs >= {PIECE}-row unpack pieces; segment {i} "
                             f"({seg.bits}-bit, k_tile={packed.k_tile}, group_size={packed.group_size}) "
                             f"gives {rows}: use backend='triton'")
    need = smem_bytes(packed, blocks.bn, blocks.stages, jnp.dtype(x_dtype).itemsize,
                      jnp.dtype(out_dtype).itemsize)
    if need > SMEM_LIMIT or packed.n_padded % blocks.bn:
        raise ValueError(f"backend='mosaic_gpu' with bn={blocks.bn}, stages={blocks.stages} needs {need} "
                         f"bytes of shared memory (limit {SMEM_LIMIT}) or bn does not divide "
                         f"N_padded={packed.n_padded}: use backend='triton' or smaller blocks")


def _tiled(minor_elems: int, itemsize: int):
    """(Tiling, Swizzle) transforms for a bf16/f16 SMEM operand whose minor dim has minor_elems."""
    plgpu = _compat.mosaic_gpu_module()
    swizzle = min(SWIZZLE, minor_elems * itemsize)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _ROW_LAYOUT():
    """Layout of a (bn,) vector that broadcasts along the rows of a WGMMA-layout (64, bn) array."""
    return _compat.mosaic_gpu_module().Layout.WGMMA.reduce(0)


def _row(ref, rows: int, interpret: bool) -> jax.Array:
    """Load a (bn,) SMEM row and broadcast it to (rows, bn).  The layout annotation guides Mosaic
    GPU's layout inference; the interpreter does not support ``plgpu.load``, and needs none."""
    if interpret:
        v = ref[...]
    else:
        load = _compat.mosaic_gpu_module().load
        idx_default = inspect.signature(load).parameters["idx"].default
        if idx_default is inspect.Parameter.empty:  # jax 0.10: the index is required
            v = load(ref, (), layout=_ROW_LAYOUT())
        else:  # jax 0.11: index the ref itself
            v = load(ref, layout=_ROW_LAYOUT())
    return jax.lax.broadcast_in_dim(v, (rows, v.shape[0]), (1,))


def _interpret_params():
    plgpu = _compat.mosaic_gpu_module()
    cls = getattr(plgpu, "InterpretGPUParams", None) or getattr(plgpu, "InterpretParams", None)
    if cls is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls  # jax 0.10
    return cls()


def _kernel_call(body, out_type, scratch, **kw):
    """plgpu.kernel with the out/scratch keyword names of this jax version."""
    plgpu = _compat.mosaic_gpu_module()
    params = inspect.signature(plgpu.kernel).parameters
    if "out_type" in params:
        return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, **kw)
    return plgpu.kernel(body, out_shape=out_type, scratch_shapes=scratch, **kw)  # pragma: no cover


def mosaic_gpu_packed_matmul(x: jax.Array, packed: PackedWeight, *, x_scale: Any = None,
                             out_dtype: Any = None, blocks: MosaicBlocks | None = None,
                             interpret: bool = False) -> jax.Array:
    """Packed matmul with the Mosaic GPU (Hopper wgmma) kernel; ``interpret=True`` runs the Mosaic
    GPU interpreter on CPU (single-block grids only: M <= 64 and N_padded == bn)."""
    plgpu = _compat.mosaic_gpu_module()
    call = _prep.check_call(x, packed, x_scale, out_dtype)
    x = jnp.asarray(x)
    blocks = blocks or choose_blocks(packed, x.dtype, call.out_dtype)
    check_supported(packed, call.mode, x.dtype, call.out_dtype, blocks)
    bn = blocks.bn
    m_pad = L.round_up(call.m, BM)
    n_pad = packed.n_padded
    segs = packed.segments
    n_seg = len(segs)
    gs = packed.group_size
    kt = packed.k_tile
    grid = (m_pad // BM, n_pad // bn)
    if interpret and grid != (1, 1):
        raise ValueError(f"the Mosaic GPU interpreter runs single-block grids only; this call has grid "
                         f"{grid} (M <= {BM} and N_padded == bn={bn} are needed)")
    itemsize = x.dtype.itemsize
    x_tf = _tiled(kt, itemsize)
    w_tf = _tiled(bn, itemsize)
    o_tf = _tiled(bn, jnp.dtype(call.out_dtype).itemsize) if call.out_dtype != jnp.float32 else ()

    x_segs = _prep.split_segments(x, packed)
    x_in = [_prep.pad_to(xs, m_pad, packed.k_padded(i)) for i, xs in enumerate(x_segs)]
    words = [list(s.words) for s in segs]
    pieces = [L.tile_pieces(s.bits, kt, gs, PIECE) for s in segs]
    tiles = [packed.k_padded(i) // kt for i in range(n_seg)]
    scale_rows = jnp.concatenate([s.scales[:1] for s in segs], axis=0)  # (n_seg, n_pad) per channel

    def kernel(*refs):
        it = iter(refs)
        x_gmem = [next(it) for _ in range(n_seg)]
        w_gmem = [[next(it) for _ in words[i]] for i in range(n_seg)]
        s_gmem = [next(it) for _ in range(n_seg)]
        srow_gmem = next(it)
        o_gmem = next(it)
        ring, s_smem, o_smem, bar = next(it), next(it), next(it), next(it)
        pid_m, pid_n = jax.lax.axis_index("m"), jax.lax.axis_index("n")

        if gs is None:
            plgpu.copy_gmem_to_smem(srow_gmem.at[:, pl.ds(pid_n * bn, bn)], s_smem, bar)

        def with_accs(*accs):  # register accumulators live in their own scope
            for i, seg in enumerate(segs):
                sbs = L.shards(seg.bits)

                def step(_, x_smem, *rest, i=i, seg=seg, sbs=sbs):
                    w_smem, sc_smem = rest[:len(sbs)], rest[len(sbs):]
                    for p_idx, pc in enumerate(pieces[i]):
                        q = KC.piece_codes(lambda sh, r0, rows: w_smem[sh][pl.ds(r0, rows), :],
                                           seg.bits, pc)
                        srow = None
                        if gs is not None:
                            srow = _row(sc_smem[0].at[pc.group], pc.rows, interpret)
                        w = DQ.with_offset(q, seg.offset, srow).astype(x.dtype)
                        slot = p_idx % 2
                        ring[slot] = w
                        plgpu.commit_smem()
                        plgpu.wgmma(accs[i], x_smem.at[:, pl.ds(pc.k0, pc.rows)], ring.at[slot])
                        plgpu.wgmma_wait(1)
                    plgpu.wgmma_wait(0)

                in_specs = [plgpu.BlockSpec((BM, kt), lambda k: (pid_m, k), transforms=x_tf)]
                in_specs += [plgpu.BlockSpec((L.word_rows(kt, sb), bn), lambda k: (k, pid_n))
                             for sb in sbs]
                if gs is not None:
                    in_specs.append(plgpu.BlockSpec((kt // gs, bn), lambda k: (k, pid_n)))
                operands = [x_gmem[i], *w_gmem[i]] + ([s_gmem[i]] if gs is not None else [])
                plgpu.emit_pipeline(step, grid=(tiles[i],), in_specs=in_specs,
                                    max_concurrent_steps=blocks.stages)(*operands)

            if gs is None:
                plgpu.barrier_wait(bar)
            y = None
            for i in range(n_seg):
                a = accs[i][...]
                if gs is None:
                    a = a * _row(s_smem.at[i], BM, interpret)
                y = a if y is None else y + a
            o_smem[...] = y.astype(o_smem.dtype)

        pl.run_scoped(with_accs, *[plgpu.ACC((BM, bn), jnp.float32) for _ in range(n_seg)])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(pid_m * BM, BM), pl.ds(pid_n * bn, bn)])
        plgpu.wait_smem_to_gmem(0)

    scratch = (
        plgpu.SMEM((2, PIECE, bn), x.dtype, transforms=w_tf),
        plgpu.SMEM((n_seg, bn), jnp.float32),
        plgpu.SMEM((BM, bn), call.out_dtype, transforms=o_tf),
        plgpu.Barrier(num_barriers=1),
    )
    f = _kernel_call(
        kernel, jax.ShapeDtypeStruct((m_pad, n_pad), call.out_dtype), scratch,
        grid=grid, grid_names=("m", "n"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": _interpret_params()} if interpret else {}))
    args = [*x_in, *[w for ws in words for w in ws], *[s.scales for s in segs], scale_rows]
    return f(*args)[: call.m, : packed.n]
