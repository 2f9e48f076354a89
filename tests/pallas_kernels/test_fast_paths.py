"""The speed-oriented pieces, checked on CPU: magic-number dequantization (its PTX program run
instruction by instruction in NumPy, assembled by ptxas when a CUDA toolkit is present, and its jnp
stand-in), the Triton kernel's single launch without padding, split-K, masked edges, the folded
permutation, the large-M hand-over and the shared-memory check."""
import importlib.util
import pathlib
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import _dequant as DQ
from pallas_kernels import _layout as L
from pallas_kernels import dispatch, gpu_triton
from pallas_kernels.gpu_triton import TritonBlocks, triton_packed_matmul
from pallas_kernels.lowering import abstract_packed, export_kernel

_spec = importlib.util.spec_from_file_location("_pk_test_kernels", pathlib.Path(__file__).with_name("test_kernels.py"))
_tk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tk)
_check, _layer, jit_run = _tk._check, _tk._layer, _tk.jit_run

DTYPES16 = ["float16", "bfloat16"]


def _programs():
    """Every (dtype, bits, output slots, center) program the Triton kernel can issue."""
    out = []
    for dt in DTYPES16:
        for bits in (1, 2, 3, 4, 8):
            if not DQ.fits16(bits, dt):
                continue
            sbs = L.shards(bits)
            shards = tuple((sb, sh, 0) for sb, sh in zip(sbs, L.shard_shifts(bits)))
            for j in range(32 // sbs[0]):
                los = (j * sbs[0],) + tuple(((3 * j + 1) % (32 // sb)) * sb for sb in sbs[1:])
                for c in (0, 2 ** (bits - 1), 2 ** bits - 1):
                    out.append((dt, bits, los, c, DQ.piece_program(dt, shards, (los,), c)))
    return out


def _expected(words, bits, los, half):
    q = np.zeros(words[0].shape, np.int64)
    for i, (sb, sh) in enumerate(zip(L.shards(bits), L.shard_shifts(bits))):
        q |= ((words[2 * i + half] >> np.uint32(los[i])) & np.uint32((1 << sb) - 1)).astype(np.int64) << sh
    return q


def test_ptx_program_semantics_every_width_slot_and_dtype():
    """Run each PTX program's instructions (prmt, shr/shl, lop3, fma.rn.{f16,bf16}x2) in NumPy on
    random word pairs: both 16-bit halves must be exactly q - c."""
    rng = np.random.default_rng(0)
    for dt, bits, los, c, prog in _programs():
        words = [rng.integers(0, 2 ** 32, size=64, dtype=np.uint64).astype(np.uint32)
                 for _ in range(prog.n_in)]
        (out,) = DQ.run_model(prog, words)
        for half in (0, 1):
            np.testing.assert_array_equal(out[:, half], _expected(words, bits, los, half) - c,
                                          err_msg=f"{dt} {bits}-bit slot {los} c={c}")
        # per shard prmt, [shift], lop3; one fma: 2-4 instructions for two weights (3-bit: 3.5)
        assert len(prog.ops) <= 3 * len(L.shards(bits)) + 1


def test_jnp_stand_in_equals_the_ptx_program():
    """The interpreter's ``emulate16`` computes what the PTX computes, bit for bit."""
    rng = np.random.default_rng(1)
    for dt, bits, los, c, prog in _programs()[::7]:
        words = [rng.integers(0, 2 ** 32, size=(16, 2), dtype=np.uint64).astype(np.uint32)
                 for _ in L.shards(bits)]
        ws = [jnp.asarray(w.view(np.int32)) for w in words]
        got = DQ.pieces16([ws], bits, [los], c, jnp.dtype(dt), use_asm=False)[0]
        pairs = [w[:, h] for w in words for h in (0, 1)]
        (model,) = DQ.run_model(prog, pairs)
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), model.astype(np.float32))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit: PTX syntax not checked")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptx_assembles(tmp_path, arch):
    """ptxas accepts every program (inline asm in a CUDA file; $n -> %n)."""
    src = ["#include <cstdint>"]
    for i, (_, _, _, _, prog) in enumerate(_programs()[::3]):
        asm = re.sub(r"\$(\d+)", r"%\1", DQ.ptx(prog)).replace("\n", "\\n\\t")
        outs = ", ".join(f'"=r"(o[{j}])' for j in range(prog.n_out))
        ins = ", ".join(f'"r"(w[{j}])' for j in range(prog.n_in))
        src.append(f'__global__ void k{i}(const uint32_t* w, uint32_t* o) {{ asm volatile("{asm}" : {outs} : {ins}); }}')
    (tmp_path / "p.cu").write_text("\n".join(src))
    r = subprocess.run(["nvcc", f"-arch={arch}", "-c", str(tmp_path / "p.cu"), "-o", str(tmp_path / "p.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_magic_number_conversions_are_exact_under_jit():
    """All 8-bit codes, integer and half-integer offsets, with scales: exact (and XLA's constant
    folding cannot merge the magic subtract with the half)."""
    q = jnp.arange(256, dtype=jnp.int32)[:, None]
    s = jnp.float32(0.375)
    for o in (0.0, 7.5, 127.5, 200.0, 218.5, 255.0):
        got = jax.jit(lambda q: DQ.with_offset(q, o, s))(q)
        np.testing.assert_array_equal(np.asarray(got), (np.arange(256)[:, None] - o) * 0.375)
        c = DQ.center(o)
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: DQ.magic32(q, c))(q)), np.arange(256)[:, None] - c)
        for dt in (jnp.float16, jnp.bfloat16):
            if DQ.fits16(8, dt):
                got = jax.jit(lambda q: DQ.emulate16(q, c, dt))(q)
                np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.arange(256)[:, None] - c)


def _prims(f, *args):
    jaxpr = jax.make_jaxpr(f)(*args)
    return [e.primitive.name for e in jaxpr.eqns]


def test_triton_small_m_is_one_kernel_without_padding(npref):
    """M = 1, permuted single-segment layer: the permutation is folded into the packing, x is not
    padded or gathered, one pallas_call (split-K with atomics into a zero-filled f32 output)."""
    rng = np.random.default_rng(3)
    codes, scales, offsets, perm = npref.random_layer(rng, [4], [4096], 4096, with_perm=True)
    p = pk.pack_mixed(codes, [4], scales, offsets=offsets, input_perm=perm)
    assert p.input_perm is None
    x = jnp.ones((1, 4096), jnp.float32)
    blocks = gpu_triton.choose_blocks(1, p, x.dtype)
    assert blocks.splits > 1 and blocks.bm == 16
    prims = _prims(lambda x, p: triton_packed_matmul(x, p), x, p)
    assert prims.count("pallas_call") == 1
    assert not {"pad", "gather", "concatenate", "dynamic_slice", "slice"} & set(prims), prims
    prims = _prims(lambda x, p: triton_packed_matmul(x, p, out_dtype=jnp.float32,
                                                     blocks=TritonBlocks(16, 32, 1, 4, 2)), x, p)
    assert prims == ["pallas_call"]


def test_fold_perm_packs_rows_in_input_order(npref):
    rng = np.random.default_rng(4)
    codes, scales, offsets, perm = npref.random_layer(rng, [3], [150], 20, with_perm=True)
    w = npref.mixed_weight(codes, [3], scales, offsets, None, perm)
    folded = pk.pack_mixed(codes, [3], scales, offsets=offsets, input_perm=perm)
    kept = pk.pack_mixed(codes, [3], scales, offsets=offsets, input_perm=perm, fold_perm=False)
    assert folded.input_perm is None and kept.input_perm is not None
    (u,) = pk.unpack(folded)
    np.testing.assert_array_equal(np.asarray(u.codes)[perm], codes[0])
    for p in (folded, kept):
        np.testing.assert_allclose(np.asarray(pk.dequantize(p)), w, rtol=1e-6, atol=1e-6)
    grouped = pk.pack_mixed(codes, [3], [np.ones((5, 20), np.float32)], group_size=32, input_perm=perm)
    assert grouped.input_perm is not None  # groups run along the permuted K: not folded
    with pytest.raises(TypeError, match="fold_perm must be a bool"):
        pk.pack_mixed(codes, [3], scales, input_perm=perm, fold_perm=1)


@pytest.mark.parametrize("dtype,group", [(jnp.bfloat16, None), (jnp.float16, 32), (jnp.bfloat16, 64)])
def test_triton_masked_edges_single_split_and_half_output(dtype, group, npref):
    """M < bm, N not a block multiple, K not a tile multiple, splits = 1 (masked stores), output in
    the activation dtype; grouped scales applied to each piece's dot output."""
    rng, packed, w64 = _layer(81, [4, 2], [530, 300], 77, group_size=group, npref=npref)
    x = jnp.asarray(rng.standard_normal((3, 830)), dtype)
    blocks = TritonBlocks(bm=16, bn=64, splits=1, num_warps=4, num_stages=2, rows=16)
    y = jit_run(lambda x, p: triton_packed_matmul(x, p, blocks=blocks, interpret=True), x, packed)
    assert y.dtype == dtype and y.shape == (3, 77)
    y64 = np.asarray(x.astype(jnp.float32), np.float64) @ w64
    assert npref.rel_err(y, y64) < 1e-2
    if group is None:  # per-channel: the operands are exact, so f32 output matches to f32 rounding
        _check(triton_packed_matmul, x, packed, w64, npref, blocks=blocks)


def test_triton_asm_is_in_the_lowered_kernel():
    p = abstract_packed([4], [4096], 4096)
    for dt, want in ((jnp.bfloat16, True), (jnp.float16, True), (jnp.float32, False)):
        text = export_kernel("triton", jax.ShapeDtypeStruct((1, 4096), dt), p).mlir_module()
        assert ("lop3.b32" in text) == want and ("prmt.b32" in text) == want, dt


def test_large_m_hands_over_to_xla_on_gpu():
    p = abstract_packed([4], [4096], 4096)
    big = dispatch.LARGE_M_CROSSOVER
    assert dispatch.plan("auto", big, p, platform="gpu").path == "xla_dequant"
    assert dispatch.plan("mosaic_gpu", big, p, platform="gpu").path == "xla_dequant"
    small = dispatch.plan("auto", big - 1, p, platform="gpu")
    assert small.path == "triton" and isinstance(small.blocks, TritonBlocks)
    assert dispatch.plan("auto", big, p, jnp.int8, platform="gpu").path == "triton"  # int8 MMA stays
    assert dispatch.plan("auto", big, p, platform="tpu").path == "tpu"
    forced = TritonBlocks(128, 128, 1, 8, 2)
    assert dispatch.plan("auto", big, p, platform="gpu", blocks=forced).blocks == forced
    text = export_kernel("triton", jax.ShapeDtypeStruct((big, 4096), jnp.bfloat16), p,
                         dispatch=True).mlir_module()
    assert "__gpu$xla.gpu.triton" not in text and "dot_general" in text


def test_shared_memory_is_checked_before_launch(monkeypatch):
    p = abstract_packed([4], [4096], 4096)
    fitted = gpu_triton.fit_smem(TritonBlocks(128, 128, 1, 8, 4), p, jnp.bfloat16)
    assert gpu_triton.smem_bytes(p, fitted, jnp.bfloat16) <= gpu_triton.SMEM_LIMIT
    assert fitted.num_stages < 4
    # float32 x with 32 one-bit pieces per step: every piece's B operand counts (an H200 asked for
    # 266240 bytes at bm=64, bn=128, 1 stage, 16-row steps), so bn is halved until it fits
    one_bit = abstract_packed([1], [1000], 300)
    seen = TritonBlocks(64, 128, 2, 8, 1, rows=16)
    assert gpu_triton.smem_bytes(one_bit, seen, jnp.float32) >= 266240
    wide = gpu_triton.fit_smem(TritonBlocks(16, 2048, 1, 8, 3), abstract_packed([1], [4096], 4096, k_tile=2048),
                               jnp.float32)
    assert wide.bn < 2048
    monkeypatch.setattr(gpu_triton, "SMEM_LIMIT", 4096)
    with pytest.raises(ValueError, match="over the 4096-byte limit"):
        gpu_triton.fit_smem(TritonBlocks(16, 128, 1, 8, 3), one_bit, jnp.float32)
    with pytest.raises(ValueError, match="over the 4096-byte limit"):  # no bn to try: still a ValueError
        gpu_triton.fit_smem(TritonBlocks(16, 48, 1, 8, 3), one_bit, jnp.float32)
    with pytest.raises(ValueError, match="blocks.bn=48 must be a power of two"):
        triton_packed_matmul(jnp.ones((2, 4096), jnp.float32), p, blocks=TritonBlocks(16, 48, 1, 4, 2),
                             interpret=True)


@pytest.mark.parametrize("case", ["per-channel-f32", "grouped-bf16", "int8"])
def test_tpu_nkm_order_dequantizes_once_and_matches(case, npref):
    """Grid (N, K, M): several M blocks reuse one dequantized weight tile held in VMEM."""
    from pallas_kernels.tpu import TpuBlocks, tpu_packed_matmul
    group = 64 if case == "grouped-bf16" else None
    rng, packed, w64 = _layer(91, [4, 8], [1030, 500], 200, group_size=group, npref=npref)
    dtype = jnp.bfloat16 if case == "grouped-bf16" else jnp.float32
    x = jnp.asarray(rng.standard_normal((45, 1530)), dtype)
    xs = None
    if case == "int8":
        x, xs = pk.quantize_activations(x)
    blocks = TpuBlocks(bm=16, bn=128, kb=(512, 512), order="nkm")
    _check(tpu_packed_matmul, x, packed, w64, npref, x_scale=xs, blocks=blocks,
           tol=1e-2 if dtype == jnp.bfloat16 else 2e-6)


def test_tpu_nkm_under_the_tpu_semantics_interpreter(npref):
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels.tpu import TpuBlocks, tpu_packed_matmul
    rng, packed, w64 = _layer(92, [2], [700], 130, npref=npref)
    x = jnp.asarray(rng.standard_normal((40, 700)), jnp.float32)
    y = tpu_packed_matmul(x, packed, interpret=pltpu.InterpretParams(out_of_bounds_reads="raise"),
                          blocks=TpuBlocks(bm=16, bn=128, kb=(512,), order="nkm"))
    assert npref.rel_err(y, np.asarray(x, np.float64) @ w64) < 2e-6


def test_tpu_block_choice_by_m():
    from pallas_kernels import tpu
    p = abstract_packed([4], [4096], 4096)
    assert tpu.choose_blocks(16, p, jnp.bfloat16).order == "nmk"        # one M block already
    big = tpu.choose_blocks(1000, p, jnp.bfloat16)
    assert big.order == "nkm" and big.bm == 256
    assert tpu.nkm_vmem(1024, big.bn, big.kb, 1) <= tpu.NKM_VMEM_BUDGET
    assert tpu.choose_blocks(65536, p, jnp.bfloat16).order == "nmk"     # accumulators too big
