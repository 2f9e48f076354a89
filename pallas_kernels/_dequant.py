"""Magic-number dequantization: codes -> exact ``q - c`` in f16/bf16 by bit tricks, no int->float.

The trick: OR an unsigned code ``q`` into the low mantissa bits of a 16-bit float constant ``Mg``
(f16 1024.0 = 0x6400, 10 mantissa bits; bf16 128.0 = 0x4300, 7 mantissa bits); the bit pattern is
then the float ``Mg + q * 2**p`` when the field sits at mantissa bit ``p``.  One fused multiply-add,
``h * 2**-p - (Mg * 2**-p + c)``, gives ``q - c`` exactly (all values are small integers).  The
integer ``c`` (``center``) is the offset rounded down; ``(o - c) * sum_k x`` is added back outside
the MMA (a half-integer offset is not representable next to 1024 in f16).

On the GPU (Triton) one 32-bit instruction handles two weights: ``elementwise_inline_asm`` with
``pack=2`` hands a thread two int32 words ``a``, ``b`` (two output elements) and takes back one
register holding two 16-bit results.  Per output piece the PTX is

    prmt.b32  t, a, b, sel        bytes {a.B, -, b.B, -}: the code's byte of each word, one per half
    [shr.b32  t, t, s]            only when the field would not fit the mantissa where it lies
    lop3.b32  r, t, mask, magic   (t & mask) | magic             two codes in two f16/bf16 halves
    fma.rn.{f16,bf16}x2 y, r, k, n   y = r * 2**-p - (Mg * 2**-p + c)

(3-bit codes OR their 1-bit shard in with one more ``prmt`` and ``lop3``).  That is 1.5-2
instructions per weight instead of shift, mask, int->float, subtract and float->16-bit per weight.
(A program may serve several pieces of one byte with one ``prmt``; the kernel issues one piece
per call, see ``pieces16``.)  The program is built once as data (``Program``); ``ptx`` renders it for
Triton and ``run_model`` executes the same instructions in NumPy for the tests, and
``emulate`` (plain jnp, exact) stands in for it in the Pallas interpreter, which has no PTX.

Where 16 bits cannot hold the code (8-bit codes with bf16 activations) or the MMA is f32, the
32-bit variant is used: ``q | 0x4B000000`` is the float32 ``2**23 + q``; subtract ``2**23 + c``
(same-width bitcast, one value per instruction, still no int->float conversion).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _layout as L

# (magic bit pattern, its value, mantissa bits, bit pattern of 1.0) per 16-bit MMA dtype
MAGIC16 = {"float16": (0x6400, 1024.0, 10, 0x3C00), "bfloat16": (0x4300, 128.0, 7, 0x3F80)}
MAGIC32 = 0x4B000000  # float32 2**23: 23 mantissa bits
MAGIC32_VALUE = float(2 ** 23)


def center(offset: float) -> int:
    """Integer part of the offset fed to the MMA as ``q - c`` (the rest goes to the epilogue)."""
    return int(math.floor(offset))


def fits16(bits: int, w_dtype) -> bool:
    """Whether ``bits``-bit codes fit the mantissa of the 16-bit MMA dtype (else use 32-bit magic)."""
    name = jnp.dtype(w_dtype).name
    return name in MAGIC16 and bits <= MAGIC16[name][2]


# --------------------------------------------------------------------------------------------
# The instruction program (data), its PTX rendering and its NumPy model
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Program:
    """Straight-line PTX on b32 registers.  ``n_in`` input operands come in pairs (a, b) per shard;
    ``n_out`` outputs; ``ops``: tuples (op, dst, *srcs) over register names; inputs are "in{i}",
    outputs "out{j}", constants are ints (immediates, moved into registers for the f16x2 ops)."""

    dtype: str
    n_in: int
    n_out: int
    ops: tuple


def _f16_bits(v: float, dtype: str) -> int:
    if dtype == "float16":
        return int(np.array(v, np.float16).view(np.uint16))
    f = np.array(v, np.float32).view(np.uint32)
    assert f & 0xFFFF == 0, f"{v} is not exact in bfloat16"
    return int(f >> 16)


def piece_program(dtype: str, shards: tuple[tuple[int, int, int], ...],
                  outputs: tuple[tuple[int, ...], ...], c: int) -> Program:
    """PTX program for several output pieces of one segment.

    shards[i] = (shard_bits, code_shift, -) describes input pair i; outputs[o][i] = the bit offset
    ``lo`` of the field in shard i's words for output o.  Output o = q - c with
    q = sum_i ((w_i >> lo_oi) & (2**sb_i - 1)) << code_shift_i, for both words of the pair.
    """
    magic, mval, mant, one = MAGIC16[dtype]
    bits = sum(sb for sb, _, _ in shards)
    assert bits <= mant
    ops = []
    prmt_done, shift_done = {}, {}
    n_tmp = [0]

    def tmp():
        n_tmp[0] += 1
        return f"t{n_tmp[0]}"

    def prmt(i, byte):
        key = (i, byte)
        if key not in prmt_done:
            d = tmp()
            sel = byte | (byte << 4) | ((4 + byte) << 8) | ((4 + byte) << 12)
            ops.append(("prmt", d, f"in{2 * i}", f"in{2 * i + 1}", sel))
            prmt_done[key] = d
        return prmt_done[key]

    def shifted(i, byte, by):
        if by == 0:
            return prmt(i, byte)
        key = (i, byte, by)
        if key not in shift_done:
            d = tmp()
            ops.append(("shr" if by > 0 else "shl", d, prmt(i, byte), abs(by)))
            shift_done[key] = d
        return shift_done[key]

    for o, los in enumerate(outputs):
        r = None
        base = 0  # mantissa position of the code's bit 0
        if len(shards) == 1:
            sb = shards[0][0]
            f = los[0] % 8
            base = f if f + sb <= mant else 0
        for i, ((sb, cshift, _), lo) in enumerate(zip(shards, los)):
            byte, f = lo // 8, lo % 8
            p = base + cshift
            t = shifted(i, byte, f - p)
            mask = ((1 << sb) - 1) << p
            d = tmp()
            ops.append(("lop3", d, t, mask | (mask << 16), r if r is not None else magic | (magic << 16)))
            r = d
        scale = 2.0 ** -base
        k = _f16_bits(scale, dtype)
        n = _f16_bits(-(mval * scale + c), dtype)
        ops.append(("fma", f"out{o}", r, k | (k << 16), n | (n << 16)))
    return Program(dtype=dtype, n_in=2 * len(shards), n_out=len(outputs), ops=tuple(ops))


def ptx(prog: Program) -> str:
    """The program as Triton inline PTX: outputs are $0..$(n_out-1), inputs follow."""
    def reg(v):
        if isinstance(v, int):
            return f"0x{v:08x}"
        if v.startswith("out"):
            return f"${int(v[3:])}"
        if v.startswith("in"):
            return f"${prog.n_out + int(v[2:])}"
        return v

    temps = sorted({op[1] for op in prog.ops if op[1].startswith("t")}, key=lambda s: int(s[1:]))
    lines = ["{", f".reg .b32 {', '.join(temps + ['k', 'n'])};"]
    kind = "f16x2" if prog.dtype == "float16" else "bf16x2"
    for op in prog.ops:
        name, d, *s = op
        if name == "prmt":
            lines.append(f"prmt.b32 {reg(d)}, {reg(s[0])}, {reg(s[1])}, 0x{s[2]:04x};")
        elif name in ("shr", "shl"):
            lines.append(f"{name}.b32 {reg(d)}, {reg(s[0])}, {s[1]};")
        elif name == "lop3":  # (a & b) | c
            lines.append(f"lop3.b32 {reg(d)}, {reg(s[0])}, {reg(s[1])}, {reg(s[2])}, 0xea;")
        elif name == "fma":
            lines.append(f"mov.b32 k, {reg(s[1])};")
            lines.append(f"mov.b32 n, {reg(s[2])};")
            lines.append(f"fma.rn.{kind} {reg(d)}, {reg(s[0])}, k, n;")
    lines.append("}")
    return "\n".join(lines)


def constraints(prog: Program) -> str:
    return ",".join(["=r"] * prog.n_out + ["r"] * prog.n_in)


def run_model(prog: Program, words: list[np.ndarray]) -> list[np.ndarray]:
    """Execute the program's instructions in NumPy (uint32 registers, IEEE 16-bit halves).

    words: ``n_in`` uint32 arrays of one shape (in0 = a of shard 0, in1 = b of shard 0, ...).
    Returns ``n_out`` arrays of shape (..., 2) float32: [low half, high half] of each output."""
    regs = {f"in{i}": np.asarray(w, np.uint32) for i, w in enumerate(words)}

    def val(v):
        return np.uint32(v) if isinstance(v, int) else regs[v]

    def halves(x):
        lo, hi = (x & np.uint32(0xFFFF)).astype(np.uint16), (x >> np.uint32(16)).astype(np.uint16)
        if prog.dtype == "float16":
            return lo.view(np.float16).astype(np.float64), hi.view(np.float16).astype(np.float64)
        f = lambda h: (h.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)  # noqa: E731
        return f(lo), f(hi)

    def pack(lo, hi):
        if prog.dtype == "float16":
            b = lambda v: v.astype(np.float16).view(np.uint16).astype(np.uint32)  # noqa: E731
        else:  # round-to-nearest-even to bf16 (exact here: results are small integers)
            def b(v):
                u = v.astype(np.float32).view(np.uint32)
                return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return b(lo) | (b(hi) << np.uint32(16))

    for name, d, *s in prog.ops:
        if name == "prmt":
            a, b, sel = val(s[0]), val(s[1]), s[2]
            src = [(a >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)] + \
                  [(b >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)]
            out = np.zeros_like(a)
            for i in range(4):
                out |= src[(sel >> (4 * i)) & 0x7] << np.uint32(8 * i)
            regs[d] = out
        elif name == "shr":
            regs[d] = val(s[0]) >> np.uint32(s[1])
        elif name == "shl":
            regs[d] = val(s[0]) << np.uint32(s[1])
        elif name == "lop3":
            regs[d] = (val(s[0]) & val(s[1])) | val(s[2])
        elif name == "fma":
            r, k, n = halves(val(s[0])), halves(val(s[1])), halves(val(s[2]))
            regs[d] = pack(r[0] * k[0] + n[0], r[1] * k[1] + n[1])
    outs = []
    for o in range(prog.n_out):
        lo, hi = halves(regs[f"out{o}"])
        outs.append(np.stack([lo, hi], axis=-1))
    return outs


# --------------------------------------------------------------------------------------------
# In-kernel use
# --------------------------------------------------------------------------------------------
def codes(words: list[jax.Array], bits: int, los: tuple[int, ...]) -> jax.Array:
    """int32 codes of one piece from its shards' words (shift, mask, OR)."""
    q = None
    for w, sb, shift, lo in zip(words, L.shards(bits), L.shard_shifts(bits), los):
        part = jax.lax.shift_right_logical(w, jnp.int32(lo)) if lo else w
        if lo + sb < 32:
            part = part & jnp.int32((1 << sb) - 1)
        if shift:
            part = jax.lax.shift_left(part, jnp.int32(shift))
        q = part if q is None else q | part
    return q


def emulate16(q: jax.Array, c: int, w_dtype) -> jax.Array:
    """What the PTX program computes, in plain jnp: bitcast(q | magic) - (Mg + c), exact."""
    magic, mval, _, _ = MAGIC16[jnp.dtype(w_dtype).name]
    h = jax.lax.bitcast_convert_type((q | jnp.int32(magic)).astype(jnp.uint16), w_dtype)
    return (h.astype(jnp.float32) - jnp.float32(mval + c)).astype(w_dtype)


def magic32(q: jax.Array, c: int) -> jax.Array:
    """float32 q - c through the 2**23 magic number (same-width bitcast, no int->float)."""
    f = jax.lax.bitcast_convert_type(q | jnp.int32(MAGIC32), jnp.float32)
    return f - jnp.float32(MAGIC32_VALUE + c)


def with_offset(q: jax.Array, offset: float, scale_row: jax.Array | None = None) -> jax.Array:
    """float32 ``(q - o) [* s]`` by the magic number, robust to constant folding: the exact integer
    ``2q - 2o`` comes out of one subtract (2o is an integer), then one multiply by ``s / 2``.
    (Writing ``magic - (2**23 + c) - (o - c)`` lets a compiler fold the two constants into one
    that float32 cannot hold next to 2**23; XLA's simplifier does, in the interpreter.)"""
    if offset == int(offset):
        f = magic32(q, int(offset))
        return f if scale_row is None else f * scale_row
    f = magic32(jax.lax.shift_left(q, jnp.int32(1)), int(2 * offset))
    return f * jnp.float32(0.5) if scale_row is None else f * (scale_row * jnp.float32(0.5))


def pieces16(words_per_out: list[list[jax.Array]], bits: int, los_per_out: list[tuple[int, ...]], c: int,
             w_dtype, use_asm: bool) -> list[jax.Array]:
    """Dequantize several pieces (each from its shards' words) to ``q - c`` in the 16-bit dtype.

    ``use_asm``: Triton inline PTX (two weights per instruction), one asm call per piece (jax 0.10's
    lowering of a multi-output ``elementwise_inline_asm`` returns one value, so each call has one
    output and its own ``prmt``); else ``emulate16`` (plain jnp, for the interpreter)."""
    if not use_asm:
        return [emulate16(codes(ws, bits, los), c, w_dtype) for ws, los in zip(words_per_out, los_per_out)]
    from jax.experimental.pallas import triton as pltriton

    shards = tuple((sb, sh, 0) for sb, sh in zip(L.shards(bits), L.shard_shifts(bits)))
    out = []
    for ws, los in zip(words_per_out, los_per_out):  # one int32 tensor per shard: two registers each
        prog = piece_program(jnp.dtype(w_dtype).name, shards, (tuple(los),), c)
        (y,) = pltriton.elementwise_inline_asm(
            ptx(prog), args=list(ws), constraints=constraints(prog), pack=2,
            result_shape_dtypes=[jax.ShapeDtypeStruct(ws[0].shape, w_dtype)])
        out.append(y)
    return out
