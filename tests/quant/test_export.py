"""Export: packed logits == phase-2 logits (dense and conv, both segments and one-level layers, both
granularities), the permutation and codes against NumPy, honest sizes, bad input."""
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pae
import pallas_kernels as pk
from pae import quant as q


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(5, (3, 3), strides=(1, 2), padding="SAME")(x))
        x = nn.Conv(6, (2, 3), padding=((1, 0), (2, 1)), kernel_dilation=(1, 2), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(37)(x))
        return nn.Dense(7)(x)


class Odd(nn.Module):
    """A kernel used outside nn.Dense/nn.Conv: export cannot run it packed."""
    @nn.compact
    def __call__(self, x, train=False):
        k = self.param("kernel", nn.initializers.normal(), (x.shape[-1], 3))
        return x @ k


def _phase2(model, x, granularity, learned_range, seed):
    v = model.init(jax.random.PRNGKey(seed), x)
    t = q.noise_injection(granularity=granularity, learned_range=learned_range)
    latent = t.init(v["params"], None)
    key = jax.random.PRNGKey(seed + 1)

    def widths(n):
        nonlocal key
        key, sub = jax.random.split(key)
        return n.replace(logits=jax.random.normal(sub, n.logits.shape) * 3.0)

    latent = pae.core.map_nodes(widths, latent, q.NoisyWeight)
    # the first conv gets one width for every channel: a one-level layer
    latent["Conv_0"]["kernel"] = latent["Conv_0"]["kernel"].replace(
        logits=jnp.full_like(latent["Conv_0"]["kernel"].logits, -1.0))
    if learned_range:
        latent = pae.core.map_nodes(lambda n: n.replace(log_range=n.log_range - 0.2), latent, q.NoisyWeight)
    stats = v.get("batch_stats", {})
    stats = jax.tree.map(lambda s: s + 0.3 * jax.random.uniform(jax.random.PRNGKey(9), s.shape), stats)
    # no second-segment overhead in the choice: these layers are too small for a split to pay for
    # its scales and permutation, and the tests need both segments
    return q.assign_palette(jax.device_get(latent), count_overhead=False), stats


@pytest.fixture(params=["dequantized", "patches"])
def lowering(request, monkeypatch):
    """Both conv lowerings (on CPU the default is "dequantized"); the calls that took it."""
    qe = importlib.import_module("pae.quant.export")
    calls = []

    def forced(backend, m, layer, x_dtype):
        calls.append(m)
        return request.param
    monkeypatch.setattr(qe, "conv_lowering", forced)
    return calls


@pytest.mark.parametrize("granularity,learned_range", [("input", False), ("output", True)])
def test_export_logits_equal_the_phase_two_model(granularity, learned_range, lowering):
    model = Net()
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 9, 11, 3))
    latent, stats = _phase2(model, x, granularity, learned_range, seed=3)
    ref = jax.jit(lambda lat, s, x: model.apply({"params": q.palette_quantizer().apply(lat, None),
                                                 "batch_stats": s}, x))(latent, stats, x)
    ex = q.export(model, latent, stats)
    got = jax.jit(ex.apply)(ex.tree, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    # both convs, M = batch x output positions (Conv_1: W = 6 + 2 + 1 - 2 * (3 - 1) = 5)
    assert lowering == [5 * 9 * 6, 5 * 9 * 5]
    layers = ex.tree["layers"]
    assert set(layers) == {"Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel", "Dense_1/kernel"}
    assert len(layers["Conv_0/kernel"].bits) == 1                      # one-level layer
    assert sum(len(lay.bits) == 2 for lay in layers.values()) >= 2     # both segments non-empty
    assert "kernel" not in ex.tree["params"]["Dense_0"] and "bias" in ex.tree["params"]["Dense_0"]
    # leading batch dims are flattened and restored like flax does
    got2 = ex.apply(ex.tree, x[:2])
    np.testing.assert_allclose(got2, ref[:2], rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_permutation_codes_and_scales_match_numpy():
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (3, 2, 6, 10)), np.float32)   # conv HWIO
    bits = np.array([2, 7, 2, 7, 7, 2], np.float32)
    node = q.QuantWeight(jnp.asarray(w), jnp.asarray(bits), jnp.asarray([2.0, 7.0]))
    ex = q.export(Odd(), {"Conv_0": {"kernel": node}})
    packed = ex.tree["layers"]["Conv_0/kernel"].packed[0]
    # rows in (Cin, kh, kw) order; low channels (0, 2, 5) first, then high (1, 3, 4)
    rows = np.arange(36).reshape(6, 6)
    want_perm = np.concatenate([rows[[0, 2, 5]].ravel(), rows[[1, 3, 4]].ravel()])
    np.testing.assert_array_equal(packed.input_perm, want_perm)
    assert packed.bits == (2, 8) and [s.k for s in packed.segments] == [18, 18]
    assert [s.offset for s in packed.segments] == [1.5, 63.5]          # 7-bit codes in 8-bit words
    w_rows = np.moveaxis(w, 2, 0).reshape(36, 10).astype(np.float64)
    r = np.abs(w_rows).max(0)
    for seg, lv, idx in zip(pk.unpack(packed), (2, 7), (want_perm[:18], want_perm[18:])):
        o = (2 ** lv - 1) / 2
        x = w_rows[idx] / (r / o) + o
        ok = np.abs(x - np.floor(x) - 0.5) > 1e-3
        np.testing.assert_array_equal(np.asarray(seg.codes)[ok], np.clip(np.round(x), 0, 2 * o)[ok])
        np.testing.assert_allclose(seg.scales, r / o, rtol=1e-6)
    # the dense weight the kernel computes with is the phase-2 quantized kernel, in row order
    want = np.moveaxis(np.asarray(q.quantize_params({"k": node})["k"]), 2, 0).reshape(36, 10)
    np.testing.assert_allclose(pk.dequantize(packed), want, rtol=1e-5, atol=1e-6)


def test_sizes_are_counted_honestly():
    model = Net()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 11, 3))
    latent, stats = _phase2(model, x, "input", False, seed=5)
    ex = q.export(model, latent, stats)
    size = q.size_bytes(ex)
    leaves = jax.tree.leaves(ex.tree)
    assert size["total"] == sum(np.asarray(a).nbytes for a in leaves)     # every stored array
    v = model.init(jax.random.PRNGKey(0), x)
    assert size["fp32"] == 4 * sum(np.size(a) for a in jax.tree.leaves(v))
    want_codes = want_perm = 0
    for lay in ex.tree["layers"].values():
        p = lay.packed[0]
        for seg in p.segments:
            want_codes += -(-seg.k * p.n * seg.bits // 8)
        want_perm += 0 if p.input_perm is None else 4 * p.k
    assert size["codes_unpadded"] == want_codes and size["perms"] == want_perm
    assert size["total_unpadded"] < size["fp32"] / 3


def test_bad_input_is_refused_naming_the_leaf():
    model = Net()
    x = jnp.ones((1, 9, 11, 3))
    latent, stats = _phase2(model, x, "input", False, seed=7)
    bad = jax.tree.map(lambda a: a, latent)
    w = np.array(bad["Dense_0"]["kernel"].weight)
    w[3, 2] = np.nan
    bad["Dense_0"]["kernel"] = bad["Dense_0"]["kernel"].replace(weight=jnp.asarray(w))
    with pytest.raises(ValueError, match="'Dense_0/kernel' has NaN or Inf"):
        q.export(model, bad, stats)
    bad = dict(latent, Dense_1=dict(latent["Dense_1"], bias=jnp.full((7,), jnp.inf)))
    with pytest.raises(ValueError, match="'Dense_1/bias' has NaN or Inf"):
        q.export(model, bad, stats)
    phase1 = q.noise_injection().init(model.init(jax.random.PRNGKey(0), x)["params"], None)
    with pytest.raises(ValueError, match="NoisyWeight"):
        q.export(model, phase1, stats)
    with pytest.raises(ValueError, match="no QuantWeight"):
        q.export(model, model.init(jax.random.PRNGKey(0), x)["params"], stats)
    node = q.QuantWeight(jnp.ones((4, 3)), jnp.full((4,), 4.0), jnp.array([4.0, 4.0]))
    ex = q.export(Odd(), {"kernel": node})
    with pytest.raises(ValueError, match=r"\['kernel'\] were not consumed"):
        ex.apply(ex.tree, jnp.ones((2, 4)))
    node = q.QuantWeight(jnp.ones((4, 3)), jnp.full((4,), 9.0), jnp.array([4.0, 9.0]))
    with pytest.raises(ValueError, match="bits"):
        q.export(Odd(), {"kernel": node})


@pytest.mark.parametrize("x_dtype,module_dtype,want_dtype,tol", [
    (jnp.uint8, None, jnp.float32, 1e-4),          # integer inputs promoted to float32
    (jnp.bfloat16, None, jnp.float32, 1e-5),       # bf16 inputs with float32 params: float32
    (jnp.float32, jnp.bfloat16, jnp.bfloat16, 2e-2)])   # the module's dtype: bf16 compute
def test_inputs_are_promoted_as_flax_promotes_them(x_dtype, module_dtype, want_dtype, tol):
    class M(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(4, (2, 2), dtype=module_dtype)(x)
            return nn.Dense(3, dtype=module_dtype)(x.reshape((x.shape[0], -1)))

    m = M()
    x = jnp.asarray(np.random.default_rng(0).integers(0, 9, (2, 4, 4, 3)), x_dtype)
    params = m.init(jax.random.PRNGKey(0), x)["params"]
    latent = q.assign_palette(jax.device_get(q.noise_injection().init(params, None)))
    want = m.apply({"params": q.palette_quantizer().apply(latent, None)}, x)
    ex = q.export(m, latent)
    got = ex.apply(ex.tree, x)
    assert want.dtype == want_dtype and got.dtype == want_dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol * float(jnp.abs(want.astype(jnp.float32)).max()))


@pytest.mark.parametrize("padding", ["same", "SAME_LOWER", "valid", "CIRCULAR"])
def test_padding_strings_as_lax_reads_them(padding, lowering):
    class C(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Conv(4, (2, 3), padding=padding)(x)

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 7, 2))
    params = C().init(jax.random.PRNGKey(1), x)["params"]
    latent = q.assign_palette(jax.device_get(q.noise_injection().init(params, None)))
    ex = q.export(C(), latent)
    if padding == "CIRCULAR":                  # not zero padding: refused, naming the layer
        with pytest.raises(NotImplementedError, match="'Conv_0/kernel' uses padding 'CIRCULAR'"):
            ex.apply(ex.tree, x)
        return
    want = C().apply({"params": q.palette_quantizer().apply(latent, None)}, x)
    np.testing.assert_allclose(ex.apply(ex.tree, x), want, rtol=1e-4, atol=1e-5)
    assert len(lowering) == 1


def test_conv_lowering_dequantizes_only_where_the_gemm_would(monkeypatch):
    """CPU: the reference GEMM dequantizes, so XLA's conv of the dequantized kernel runs; a GPU runs
    the patches through the packed kernel below LARGE_M_CROSSOVER output positions and dequantizes
    at or above it (dispatch's "xla_dequant")."""
    import pallas_kernels.dispatch as dispatch
    qe = importlib.import_module("pae.quant.export")
    x = jnp.ones((1, 6, 6, 3))
    params = nn.Conv(4, (3, 3)).init(jax.random.PRNGKey(0), x)["params"]
    ex = q.export(nn.Conv(4, (3, 3)), q.assign_palette(jax.device_get(
        q.noise_injection().init({"Conv_0": params}, None))))
    layer = ex.tree["layers"]["Conv_0/kernel"]
    assert qe.conv_lowering("auto", 36, layer, jnp.float32) == "dequantized"
    monkeypatch.setattr(dispatch, "_platform", lambda: "gpu")
    big = dispatch.LARGE_M_CROSSOVER
    assert qe.conv_lowering("auto", big - 1, layer, jnp.float32) == "patches"
    assert qe.conv_lowering("auto", big, layer, jnp.float32) == "dequantized"


def test_a_masked_convolution_is_refused():
    class Masked(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Conv(4, (3, 3), mask=jnp.ones((3, 3, 2, 4)).at[2].set(0.0))(x)

    x = jnp.ones((1, 5, 5, 2))
    params = Masked().init(jax.random.PRNGKey(0), x)["params"]
    ex = q.export(Masked(), q.assign_palette(jax.device_get(q.noise_injection().init(params, None))))
    with pytest.raises(NotImplementedError, match="'Conv_0/kernel' has a kernel mask"):
        ex.apply(ex.tree, x)


@pytest.mark.parametrize("granularity", ["input", "output"])
def test_saved_file_is_tight_and_loads_the_exact_packed_arrays(tmp_path, granularity):
    import os
    model = Net()
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 9, 11, 3))
    latent, stats = _phase2(model, x, granularity, granularity == "output", seed=11)
    ex = q.export(model, latent, stats)
    path = tmp_path / "net.npz"
    q.save_exported(str(path), ex)
    back = q.load_exported(str(path), model)
    # the re-packed layers are the exported ones, array for array, bit for bit
    assert list(back.tree["layers"]) == list(ex.tree["layers"])
    for name, lay in ex.tree["layers"].items():
        got = back.tree["layers"][name]
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(lay)
        for a, b in zip(jax.tree.leaves(lay), jax.tree.leaves(got)):
            assert np.asarray(a).dtype == np.asarray(b).dtype and np.asarray(a).shape == np.asarray(b).shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert (got.kernel_shape, got.bits) == (lay.kernel_shape, lay.bits)
    np.testing.assert_array_equal(np.asarray(back.apply(back.tree, x)), np.asarray(ex.apply(ex.tree, x)))
    # the file holds the tight arrays: its size is the reported total plus a small container overhead
    size = q.size_bytes(ex)
    assert q.size_bytes(back) == size
    assert size["file"] == size["tight"] and size["memory"] == size["total"]
    with np.load(path) as f:
        payload = sum(f[k].nbytes for k in f.files if k != "meta")
        n_entries = len(f.files)
        meta_bytes = f["meta"].nbytes
    assert payload == size["file"]
    file_bytes = os.path.getsize(path)
    assert size["file"] < file_bytes <= size["file"] + meta_bytes + 400 * n_entries   # npy header + zip entries
    # small layers: padding dominates memory, not the file
    assert size["codes_file"] <= size["codes_unpadded"] < size["codes"]
    assert size["file"] <= size["total_unpadded"] < size["total"]
    assert size["file"] < size["memory"] / 3


def test_bitpacking_round_trips_every_width():
    import importlib
    qe = importlib.import_module("pae.quant.export")
    rng = np.random.default_rng(0)
    for width in range(1, 9):
        for shape in [(1, 1), (3, 5), (17, 13), (512, 7)]:
            codes = rng.integers(0, 2 ** width, shape).astype(np.uint8)
            buf = qe._packbits(codes, width)
            assert buf.dtype == np.uint8 and buf.size == -(-codes.size * width // 8)
            np.testing.assert_array_equal(qe._unpackbits(buf, shape, width), codes)
    assert qe._perm_dtype(256) == np.uint8 and qe._perm_dtype(257) == np.uint16
    assert qe._perm_dtype(70000) == np.int32


def test_bfloat16_leaves_round_trip_through_the_file(tmp_path):
    """``.npz`` holds no bfloat16 (it writes raw bytes that load back unreadable): such leaves are
    stored as their uint16 view and viewed back, bit for bit."""
    model = Net()
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 9, 11, 3))
    latent, stats = _phase2(model, x, "input", False, seed=11)
    ex = q.export(model, latent, stats)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                          ex.tree["params"])
    ex = ex._replace(tree={**ex.tree, "params": params})
    assert any(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params))
    q.save_exported(str(tmp_path / "bf16.npz"), ex)
    back = q.load_exported(str(tmp_path / "bf16.npz"), model)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back.tree["params"])):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


class HalfParams(nn.Module):
    """bf16 parameters, the input passed by keyword."""
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(5, param_dtype=jnp.bfloat16)(inputs=x)


def test_export_computes_in_the_phase_two_dtype_and_takes_keyword_inputs():
    """With bf16 parameters the phase-2 model's quantized kernel is float32, so flax computes in
    float32; the export does too (it used to drop to bf16, 2e-3 off), and an input passed by keyword
    reaches the packed GEMM. Both against a float64 NumPy reference."""
    m = HalfParams()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 64)).astype(jnp.bfloat16)
    params = m.init(jax.random.PRNGKey(1), x)["params"]
    latent = q.assign_palette(jax.device_get(q.noise_injection().init(params, None)), fixed=(2, 6))
    phase2 = m.apply({"params": q.palette_quantizer().apply(latent, None)}, x)
    ex = q.export(m, latent)
    got = ex.apply(ex.tree, x)
    node = latent["Dense_0"]["kernel"]
    w = np.asarray(node.weight, np.float64)
    o = (2 ** np.asarray(node.bits, np.float64)[:, None] - 1) / 2
    d = np.abs(w).max(0) / o
    ref = np.asarray(x, np.float64) @ ((np.clip(np.round(w / d + o), 0, 2 * o) - o) * d) \
        + np.asarray(params["Dense_0"]["bias"], np.float64)
    assert phase2.dtype == got.dtype == jnp.float32
    for y in (phase2, got):
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
