"""Bit layout of the packed format (pure Python; shared by pack, unpack, reference and kernels).

A segment of ``bits``-bit codes is stored as one or more *shards*, each holding ``sb`` bits of
every code (``sb`` a power of two, so ``32 // sb`` codes fit one int32 word exactly):

    bits:   1     2     3        4     8
    shards: (1,)  (2,)  (2, 1)   (4,)  (8,)

Shard ``i`` holds code bits ``[sum(shards[:i]), sum(shards[:i+1]))``.  Inside a shard, codes are
packed along K (the reduction axis) in *tile-planar* order: K is cut into tiles of ``k_tile`` rows;
with ``p = 32 // sb`` slots per word and ``R = k_tile // p`` word rows per tile,

    code row k = t * k_tile + j * R + r   lives in   word row t * R + r,  bits [j * sb, (j + 1) * sb).

So slot ``j`` of a tile's word rows is the *contiguous* K-slice ``[j * R, (j + 1) * R)`` of that
tile: a kernel turns words into a weight slice with one shift and one mask, with no shuffles, and
the matching activation slice is contiguous too.
"""
from __future__ import annotations

import dataclasses

FORMAT_VERSION = 1
SUPPORTED_BITS = (1, 2, 3, 4, 8)
SUPPORTED_K_TILES = (512, 1024, 2048)
SUPPORTED_N_TILES = (128, 256, 512)
MIN_GROUP_SIZE = 16

_SHARDS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}


def shards(bits: int) -> tuple[int, ...]:
    """Bit widths of the shards that store a ``bits``-bit code (sum == bits)."""
    return _SHARDS[bits]


def shard_shifts(bits: int) -> tuple[int, ...]:
    """Position of each shard's lowest bit inside the code."""
    out, acc = [], 0
    for sb in shards(bits):
        out.append(acc)
        acc += sb
    return tuple(out)


def slots(shard_bits: int) -> int:
    """Codes per int32 word for a shard of ``shard_bits`` bits."""
    return 32 // shard_bits


def word_rows(k_rows: int, shard_bits: int) -> int:
    """Word rows that hold ``k_rows`` code rows (k_rows a multiple of the slot count)."""
    return k_rows * shard_bits // 32


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class Piece:
    """A contiguous K-slice of one tile, as seen by a kernel.

    ``k0``: first code row of the piece inside the tile; ``rows``: its length.
    ``loads``: for each shard, (first word row inside the tile, slot index).
    ``group``: index of the scale group inside the tile (None without groups).
    """

    k0: int
    rows: int
    loads: tuple[tuple[int, int], ...]
    group: int | None


def tile_pieces(bits: int, k_tile: int, group_size: int | None,
                max_rows: int | None = None) -> tuple[Piece, ...]:
    """Cut one tile into pieces, in increasing K order, each readable from every shard's words.

    A piece is ``P = min(R_min, group_size, max_rows)`` rows long, ``R_min`` being the word rows
    per tile of the finest shard, so each piece is one slot of a row range of each shard and lies
    inside one scale group.
    """
    sbs = shards(bits)
    r_min = min(k_tile // slots(sb) for sb in sbs)
    p = min(r for r in (r_min, group_size, max_rows) if r is not None)
    pieces = []
    for k0 in range(0, k_tile, p):
        loads = []
        for sb in sbs:
            r_sh = k_tile // slots(sb)
            loads.append((k0 % r_sh, k0 // r_sh))
        group = None if group_size is None else k0 // group_size
        pieces.append(Piece(k0=k0, rows=p, loads=tuple(loads), group=group))
    return tuple(pieces)
