"""In-kernel unpacking shared by the TPU, Triton and Mosaic GPU kernels (plain jax.numpy/lax ops)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import _dequant as DQ
from pallas_kernels import _layout as L


def piece_codes(load: Callable[[int, int, int], jax.Array], bits: int, piece: L.Piece) -> jax.Array:
    """int32 codes (piece.rows, bn) of one piece: ``q = sum_i ((w_i >> slot_i*sb_i) & mask_i) << shift_i``.

    ``load(shard, first_word_row_in_tile, rows)`` returns int32 words (rows, bn).
    """
    q = None
    for sh, (sb, shift) in enumerate(zip(L.shards(bits), L.shard_shifts(bits))):
        row0, slot = piece.loads[sh]
        w = load(sh, row0, piece.rows)
        lo = slot * sb
        part = jax.lax.shift_right_logical(w, jnp.int32(lo)) if lo else w
        if lo + sb < 32:  # the top slot needs no mask after a logical shift
            part = part & jnp.int32((1 << sb) - 1)
        if shift:
            part = jax.lax.shift_left(part, jnp.int32(shift))
        q = part if q is None else q | part
    return q


def piece_operand(q: jax.Array, bits: int, offset: float, mode: str,
                  scale_row: jax.Array | None) -> jax.Array:
    """Weight values of a piece before the cast to the MMA dtype (magic-number int -> float).

    float, per-channel scales: q - c, c = floor(o), exact in every MMA dtype; the remainder
    (o - c) * sum_k x is subtracted in the epilogue (``float_corrections``);
    float, grouped scales: (q - o) * s_group;   int: q - 2**(bits-1) as int32 (fits int8).
    """
    if mode == "int":
        return q - jnp.int32(2 ** (bits - 1))
    if scale_row is None:
        return DQ.magic32(q, DQ.center(offset))
    return DQ.with_offset(q, offset, scale_row)


def epilogue(accs, scale_rows, mode: str, corrs=None, x_scale=None) -> jax.Array:
    """y = [x_scale *] sum_s (acc_s [- corr_s]) [* s_s]   in float32 (scale_rows[s] None if grouped;
    corrs[s] None where a segment has no row term)."""
    y = None
    for s, acc in enumerate(accs):
        a = acc.astype(jnp.float32)
        if corrs is not None and corrs[s] is not None:
            a = a - corrs[s]
        if scale_rows[s] is not None:
            a = a * scale_rows[s]
        y = a if y is None else y + a
    if mode == "int":
        y = y * x_scale
    return y
