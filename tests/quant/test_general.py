"""DenseGeneral kernels (attention's q/k/v/out) and lookup tables (nn.Embed, a raw positional
table) through noise injection, activation quantization, palettes and export: NumPy references for
the (K, N) reshape and grouping, export == phase-2 logits on a random attention net, the layout
ambiguity refused."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pae
import pallas_kernels as pk
from pae import quant as q
from pae.quant.export import dequantize_layer

V, T, W = 11, 6, 8
TABLES = pae.core.select.kernels() | pae.core.select.path(r"(^|/)(embedding|pos_embedding)$")


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens, train=False):
        x = nn.Embed(V, W)(tokens)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.5), (T, W))[:tokens.shape[1]]
        causal = nn.make_causal_mask(jnp.ones(tokens.shape, bool))
        x = x + nn.MultiHeadDotProductAttention(2)(nn.LayerNorm()(x), mask=causal)
        x = x + nn.Dense(W)(nn.gelu(nn.Dense(12)(nn.LayerNorm()(x))))
        return nn.Dense(V)(x)


def _tokens(seed, n=5):
    return jax.random.randint(jax.random.PRNGKey(seed), (n, T), 0, V)


def _np_quantize_rows(w2, row_bits, r):
    """NumPy: the mid-rise quantizer on a (K, N) matrix, one width per row, one range per column."""
    o = (2.0 ** row_bits[:, None] - 1) / 2
    delta = r[None, :] / o
    qc = np.clip(np.round(np.clip(w2, -r, r) / delta + o), 0, 2 * o)
    return (qc - o) * delta


def _np_quantize_cols(w2, col_bits, r):
    """NumPy: one width and one range per column."""
    o = (2.0 ** col_bits[None, :] - 1) / 2
    delta = r[None, :] / o
    qc = np.clip(np.round(w2 / delta + o), 0, 2 * o)
    return (qc - o) * delta


def test_layouts_are_read_from_the_modules_and_ambiguity_is_refused():
    model, x = TinyLM(), _tokens(0)
    lay = q.kernel_layouts(model, x)
    att = "MultiHeadDotProductAttention_0"
    assert lay == {f"{att}/query/kernel": 1, f"{att}/key/kernel": 1, f"{att}/value/kernel": 1,
                   f"{att}/out/kernel": 2}
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
    with pytest.raises(ValueError, match="ambiguous"):          # 3-D kernels without their layout
        q.noise_injection().init(params, None)
    with pytest.raises(ValueError, match="not leaves"):
        q.noise_injection(layouts={"Nope/kernel": 1}).init(params, None)
    with pytest.raises(ValueError, match="contracted axes"):
        q.noise_injection(layouts={**lay, f"{att}/out/kernel": 3}).init(params, None)
    with pytest.raises(ValueError, match="layouts"):
        q.noise_injection(layouts={f"{att}/out/kernel": "dense"})
    # a 4-D DenseGeneral kernel defaults to the conv layout; export refuses to run it mis-grouped
    class G(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.DenseGeneral((2, 3), axis=(-2, -1))(x)

    g, xg = G(), jax.random.normal(jax.random.PRNGKey(1), (4, 3, 5))
    lat = q.assign_palette(q.noise_injection().init(g.init(jax.random.PRNGKey(0), xg)["params"], None))
    ex = q.export(g, lat)
    with pytest.raises(ValueError, match="contracting 2 axes"):
        ex.apply(ex.tree, xg)
    lat = q.assign_palette(q.noise_injection(layouts=q.kernel_layouts(g, xg)).init(
        g.init(jax.random.PRNGKey(0), xg)["params"], None))
    ex = q.export(g, lat)
    ref = g.apply({"params": q.quantize_params(lat)}, xg)
    np.testing.assert_allclose(ex.apply(ex.tree, xg), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("granularity", ["input", "output"])
def test_general_kernel_grouping_matches_numpy(granularity):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 4, 5)).astype(np.float32)            # out projection: (heads, head_dim, out)
    t = q.noise_injection(layouts={"out/kernel": 2}, granularity=granularity)
    lat = t.init({"out": {"kernel": w}}, None)
    node = lat["out"]["kernel"]
    c = 8 if granularity == "input" else 5
    assert node.k_axes == 2 and node.logits.shape == (c,)
    # the noise: one width per K row (or N column), the range per column of the (K, N) matrix
    bits = rng.uniform(1.5, 7.5, c)
    node = node.replace(logits=jnp.log((bits - 1) / (8 - bits)).astype(jnp.float32))
    w2 = w.reshape(8, 5)
    r = np.abs(w2).max(axis=0)
    delta = 2 * r[None, :] / (2.0 ** (bits[:, None] if granularity == "input" else bits[None, :]) - 1)
    noisy = np.asarray(t.apply({"out": {"kernel": node}}, pae.Context.make(key=4, train=True))["out"]["kernel"])
    u = (noisy.reshape(8, 5) - w2) / delta
    assert np.abs(u).max() <= 0.5 + 1e-4 and np.abs(u).max() > 0.3
    # phase 2: the quantized kernel and the export's packed (K, N) rows
    pal = q.assign_palette({"out": {"kernel": node}}, count_overhead=False)["out"]["kernel"]
    pb = np.asarray(pal.bits, np.float64)
    assert set(np.unique(pb)) == set(np.asarray(pal.levels)) and len(np.unique(pb)) == 2
    got = np.asarray(q.quantize_params({"out": {"kernel": pal}})["out"]["kernel"])
    want = _np_quantize_rows(w2, pb, r) if granularity == "input" else _np_quantize_cols(w2, pb, r)
    np.testing.assert_allclose(got.reshape(8, 5), want, rtol=1e-5, atol=1e-6)
    layer = q.export(nn.Dense(1), {"out": {"kernel": pal}}).tree["layers"]["out/kernel"]
    assert layer.k_axes == 2 and layer.kernel_shape == (2, 4, 5)
    if granularity == "input":
        p = layer.packed[0]
        lo, hi = np.flatnonzero(pb == pb.min()), np.flatnonzero(pb == pb.max())
        np.testing.assert_array_equal(np.asarray(p.input_perm), np.concatenate([lo, hi]))
        assert [s.k for s in p.segments] == [lo.size, hi.size]
    np.testing.assert_allclose(np.asarray(dequantize_layer(layer)), want.reshape(w.shape),
                               rtol=1e-5, atol=1e-6)


def _lm_phase2(model, x, granularity):
    cfg = q.QuantConfig(activations=True, granularity=granularity, layouts=q.kernel_layouts(model, x))
    t = q.noise_transform(cfg, TABLES)
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    latent = t.init(v["params"], jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(2)

    def widths(n):
        nonlocal key
        key, sub = jax.random.split(key)
        return n.replace(logits=jax.random.normal(sub, n.logits.shape) * 3.0)

    latent = pae.core.map_nodes(widths, latent, (q.NoisyWeight, q.NoisyAct))
    stats = q.with_act_stats({}, latent)
    wrapped = q.quantize_activations(model)

    @jax.jit
    def train_stats(lat, s, key):
        return wrapped.apply({"params": t.apply(lat, pae.Context.make(key=key)), "batch_stats": s},
                             x, train=True, mutable=["batch_stats"])[1]["batch_stats"]

    for i in range(2):                       # running statistics from noisy training batches
        stats = train_stats(latent, stats, jax.random.PRNGKey(i))
    return q.assign_palette(jax.device_get(latent), count_overhead=False), jax.device_get(stats)


def test_attention_lm_export_equals_phase_two(tmp_path):
    model, x = TinyLM(), _tokens(0)
    latent, stats = _lm_phase2(model, x, "input")
    wrapped = q.quantize_activations(model)
    ref = jax.jit(lambda lat, s, x: wrapped.apply({"params": q.palette_quantizer().apply(lat, None),
                                                   "batch_stats": s}, x, train=False))(latent, stats, x)
    ex = q.export(wrapped, latent, stats)
    got = jax.jit(ex.apply)(ex.tree, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    layers = ex.tree["layers"]
    att = "MultiHeadDotProductAttention_0"
    assert {p: lay.k_axes for p, lay in layers.items() if att in p} == {
        f"{att}/query/kernel": 1, f"{att}/key/kernel": 1, f"{att}/value/kernel": 1, f"{att}/out/kernel": 2}
    assert layers["Embed_0/embedding"].table and layers["pos_embedding"].table
    assert not layers[f"{att}/out/kernel"].table
    assert all(len(lay.bits) == 2 for lay in layers.values())                 # both segments non-empty
    # the attention inputs are quantized per K row: out's input has heads * head_dim = 8 channels
    assert ex.tree["acts"][f"{att}/out"]["bits"].shape == (8,)
    assert "Embed_0" not in ex.tree["acts"]                                   # a lookup has no input
    # everything but LayerNorm params and biases is packed; those stay float and are counted
    floats = pae.core.select.leaf_paths(ex.tree["params"])
    assert floats and all(p.rsplit("/", 1)[-1] in ("bias", "scale") for p in floats)
    size = q.size_bytes(ex)
    n_params = sum(np.size(a) for a in jax.tree.leaves(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]))
    assert size["fp32"] == 4 * n_params
    assert size["float"] == 4 * sum(np.size(a) for a in jax.tree.leaves(ex.tree["params"]))
    # saved and loaded: the same logits
    q.save_exported(str(tmp_path / "lm.npz"), ex)
    back = q.load_exported(str(tmp_path / "lm.npz"), model)
    np.testing.assert_array_equal(np.asarray(jax.jit(back.apply)(back.tree, x)), np.asarray(got))
    assert q.size_bytes(back) == size
