"""Activation quantization against NumPy: the per-channel grids (symmetric, unsigned, auto), the
straight-through gradient, the noise (uniform, exactly the deployed step), the running range, the
penalty/budget, palettes, and export == phase-2 logits (dense and conv, both segments, one-level
layers), save/load, export after sparsity, bad input."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pae
import pallas_kernels as pk
from pae import quant as q
from pae.quant import activations as qa
from pae.quant.export import container_bits


def np_grid(bits, r, unsigned):
    levels = 2.0 ** np.asarray(bits, np.float64) - 1
    delta = np.where(unsigned, r, 2 * r) / levels
    o = np.where(unsigned, 0.0, levels / 2)
    return delta, o


def np_quantize(x, bits, r, unsigned):
    delta, o = np_grid(bits, r, unsigned)
    lo = np.where(unsigned, 0.0, -r)
    xc = np.clip(x, lo, r)
    codes = np.clip(np.round(xc / delta + o), 0, 2.0 ** bits - 1)
    return codes, (codes - o) * delta


def test_quantizer_levels_codes_ste_and_one_bit_match_numpy():
    rng = np.random.default_rng(0)
    c = 6
    bits = np.array([1, 2, 3, 4, 7, 8], np.float32)
    r = rng.uniform(0.5, 2.0, c).astype(np.float32)
    x = (rng.normal(size=(400, c)) * 1.5).astype(np.float32)
    for unsigned in (np.zeros(c, bool), np.ones(c, bool), np.arange(c) % 2 == 0):
        want_codes, want = np_quantize(x.astype(np.float64), bits, r, unsigned)
        got = np.asarray(qa.quantize_act(jnp.asarray(x), bits, r, unsigned))
        codes = np.asarray(qa.act_codes(jnp.asarray(x), bits, r, unsigned))
        # away from rounding ties the codes are exact
        delta, o = np_grid(bits, r, unsigned)
        t = np.clip(x, np.where(unsigned, 0, -r), r) / delta + o
        ok = np.abs(t - np.floor(t) - 0.5) > 1e-3
        np.testing.assert_array_equal(codes[ok], want_codes[ok])
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-6)
        for j in range(c):               # every value is a level of its channel's grid
            lv = (np.arange(2 ** int(bits[j])) - o[j]) * delta[j]
            assert np.abs(got[:, j, None] - lv[None]).min(1).max() < 1e-5
        # STE: dQ/dx = 1 inside [lo, R], 0 outside
        g = rng.normal(size=x.shape).astype(np.float32)
        grad = jax.grad(lambda x: jnp.sum(qa.quantize_act(x, bits, r, unsigned) * g))(jnp.asarray(x))
        inside = (x >= np.where(unsigned, 0, -r)) & (x <= r)
        np.testing.assert_allclose(np.asarray(grad), np.where(inside, g, 0.0), rtol=1e-6)
    # 1 bit: symmetric {-R, +R} (no zero level), unsigned {0, R}
    r1 = np.float32(1.3)
    xs = jnp.asarray([[-2.0], [-0.1], [0.0], [0.2], [5.0]])
    sym = np.asarray(qa.quantize_act(xs, np.float32([1]), r1, np.bool_([False]))).ravel()
    np.testing.assert_allclose(sym, [-1.3, -1.3, -1.3, 1.3, 1.3], rtol=1e-6)  # 0: a tie, to even code 0
    uns = np.asarray(qa.quantize_act(xs, np.float32([1]), r1, np.bool_([True]))).ravel()
    np.testing.assert_allclose(uns, [0.0, 0.0, 0.0, 0.0, 1.3], rtol=1e-6)
    # an unsigned grid keeps exact zeros (ReLU outputs), the symmetric one cannot
    assert float(qa.quantize_act(jnp.zeros((1, 1)), np.float32([3]), 1.0, np.bool_([True]))[0, 0]) == 0.0


def test_noise_is_uniform_with_exactly_the_deployed_step():
    rng = np.random.default_rng(1)
    c = 4
    bits = jnp.asarray([1.3, 2.5, 4.0, 6.7], jnp.float32)          # continuous widths
    r = np.array([1.0, 0.5, 2.0, 3.0], np.float32)
    unsigned = np.array([False, True, False, True])
    x = (rng.normal(size=(20000, c))).astype(np.float32)
    noisy = np.asarray(qa.noisy_act(jnp.asarray(x), bits, r, unsigned, jax.random.PRNGKey(3)))
    delta, _ = np_grid(np.asarray(bits, np.float64), r, unsigned)
    # the deployed quantizer's step at the same (here continuous) width
    np.testing.assert_allclose(np.asarray(qa.grid_params(bits, r, unsigned)[0]), delta, rtol=1e-6)
    u = (noisy - np.clip(x, np.where(unsigned, 0, -r), r)) / delta
    assert u.min() >= -0.5 - 1e-4 and u.max() <= 0.5 + 1e-4
    np.testing.assert_allclose(u.mean(0), 0.0, atol=0.01)
    np.testing.assert_allclose(u.var(0), 1 / 12, rtol=0.03)
    hist = np.histogram(u[:, 0], bins=10, range=(-0.5, 0.5))[0] / len(u)
    np.testing.assert_allclose(hist, 0.1, atol=0.01)
    # the reparameterization gradient reaches the widths: d/db sum(delta(b) u) = sum(u) ddelta/db
    g = jax.grad(lambda b: jnp.sum(qa.noisy_act(jnp.asarray(x), b, r, unsigned,
                                                 jax.random.PRNGKey(3))))(bits)
    b = np.asarray(bits, np.float64)
    ddelta = -delta * np.log(2) * 2 ** b / (2 ** b - 1)
    np.testing.assert_allclose(np.asarray(g), u.sum(0) * ddelta, rtol=2e-3, atol=1e-2)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(9)(x))
        return nn.Dense(3)(x)


def test_running_range_and_auto_grid_in_the_wrapped_model():
    m = MLP()
    x1 = jax.random.normal(jax.random.PRNGKey(0), (16, 5))
    x2 = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (16, 5))
    params = m.init(jax.random.PRNGKey(2), x1)["params"]
    t = q.act_noise_injection(momentum=0.8, b_init=4.0)
    latent = t.init(params, None)
    assert set(qa.act_paths(latent)) == {"Dense_0", "Dense_1"}
    stats = q.with_act_stats({}, latent)
    wrapped = q.quantize_activations(m)
    ctx = pae.Context.make(key=0)
    seen = []
    for x in (x1, x2):
        _, upd = wrapped.apply({"params": t.apply(latent, ctx), "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
        stats = upd["batch_stats"]
        seen.append(np.abs(np.asarray(x)).max(0))
    st = stats["Dense_0"]["act"]
    ema = 0.8 * (0.2 * seen[0]) + 0.2 * seen[1]
    np.testing.assert_allclose(st["ema"], ema, rtol=1e-5)
    assert float(st["count"]) == 2
    np.testing.assert_allclose(qa.running_range(st, 0.8), ema / (1 - 0.8 ** 2), rtol=1e-5)
    np.testing.assert_allclose(st["min"], np.minimum(np.asarray(x1).min(0), np.asarray(x2).min(0)))
    # the hidden layer's inputs follow a ReLU: "auto" picks the unsigned grid there only
    assert np.all(np.asarray(stats["Dense_1"]["act"]["min"]) >= 0)
    assert np.all(np.asarray(qa.is_unsigned(2, stats["Dense_1"]["act"])))
    assert not np.any(np.asarray(qa.is_unsigned(2, stats["Dense_0"]["act"])))
    # evaluation: statistics frozen; the forward is the NumPy quantized pipeline at the rounded widths
    v = {"params": t.apply(latent, ctx.replace(train=jnp.zeros((), bool))), "batch_stats": stats}
    got = wrapped.apply(v, x1, train=False)
    p = jax.tree.map(np.asarray, params)

    def qin(h, layer):
        s = jax.tree.map(np.asarray, stats[layer]["act"])
        r = s["ema"] / (1 - 0.8 ** s["count"])
        return np_quantize(h, np.full(h.shape[-1], 4.0), r, s["min"] >= 0)[1]

    h = np.maximum(qin(np.asarray(x1, np.float64), "Dense_0") @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
    want = qin(h, "Dense_1") @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the unwrapped model ignores the "act" entries: the wrapper is what quantizes
    plain = m.apply({"params": t.apply(latent, ctx)}, x1)
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-3


def test_an_input_passed_by_keyword_is_quantized_too():
    """nn.Dense(3)(inputs=x) gets the same activation noise and statistics as nn.Dense(3)(x)."""
    class Keyword(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3, name="d")(inputs=x)

    class Positional(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3, name="d")(x)

    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    params = Positional().init(jax.random.PRNGKey(1), x)["params"]
    t = q.noise_transform(q.QuantConfig(activations=True))
    latent = t.init(params, jax.random.PRNGKey(0))
    ctx = pae.Context.make(key=3)
    out = []
    for m in (Keyword(), Positional()):
        y, upd = q.quantize_activations(m).apply(
            {"params": t.apply(latent, ctx), "batch_stats": q.with_act_stats({}, latent)}, x, train=True,
            mutable=["batch_stats"])
        assert float(upd["batch_stats"]["d"]["act"]["count"]) == 1.0
        out.append(y)
    np.testing.assert_array_equal(out[0], out[1])


def test_with_act_stats_keeps_existing_statistics_and_accepts_frozen_dicts():
    from flax.core import freeze
    m = MLP()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    latent = q.act_noise_injection().init(m.init(jax.random.PRNGKey(1), x)["params"], None)
    kept = {"ema": np.full(5, 7.0), "count": np.asarray(3), "min": np.zeros(5)}
    given = freeze({"Dense_0": {"act": kept}, "Other": {"mean": np.ones(2)}})
    stats = q.with_act_stats(given, latent)
    assert isinstance(stats["Dense_0"], dict)
    np.testing.assert_array_equal(stats["Dense_0"]["act"]["ema"], kept["ema"])   # kept, not reset
    np.testing.assert_array_equal(stats["Other"]["mean"], np.ones(2))
    assert float(stats["Dense_1"]["act"]["count"]) == 0                          # added fresh
    plain = {"Dense_0": {}}
    q.with_act_stats(plain, latent)
    assert plain == {"Dense_0": {}}                                              # input untouched


def test_penalty_budget_and_average_are_per_channel_means():
    m = MLP()
    params = m.init(jax.random.PRNGKey(0), jnp.ones((1, 5)))["params"]
    t = q.act_noise_injection(lmbda=0.3, target_bits=3.0, budget_weight=2.0)
    latent = t.init(params, None)
    rng = np.random.default_rng(0)
    latent["Dense_0"]["act"] = latent["Dense_0"]["act"].replace(logits=jnp.asarray(rng.normal(size=5), jnp.float32))
    latent["Dense_1"]["act"] = latent["Dense_1"]["act"].replace(logits=jnp.asarray(rng.normal(size=9), jnp.float32))
    b = np.concatenate([1 + 7 / (1 + np.exp(-np.asarray(latent[k]["act"].logits, np.float64)))
                        for k in ("Dense_0", "Dense_1")])
    avg = b.mean()                               # 14 channels, one vote each
    np.testing.assert_allclose(float(q.average_act_bits(latent)), avg, rtol=1e-6)
    np.testing.assert_allclose(float(t.penalty(latent, None)), 0.3 * avg + 2.0 * abs(avg - 3.0), rtol=1e-5)
    hinge = q.act_noise_injection(target_bits=7.5, budget_form="hinge")
    np.testing.assert_allclose(float(hinge.penalty(latent, None)), max(avg - 7.5, 0.0), atol=1e-7)
    # the budget's gradient pushes every width toward the target (all channels equally)
    g = jax.grad(lambda lat: t.penalty(lat, None))(latent)
    db = np.concatenate([np.asarray(g[k]["act"].logits) for k in ("Dense_0", "Dense_1")])
    sig = (b - 1) / 7
    np.testing.assert_allclose(db, (0.3 + 2.0 * np.sign(avg - 3.0)) / 14 * 7 * sig * (1 - sig), rtol=1e-4)
    # the weights' average is untouched by activation nodes
    wl = q.noise_injection().init(latent, None)
    assert float(q.average_bits(wl)) == pytest.approx(6.0, rel=1e-6)


def test_activation_palettes_follow_choose_palette():
    m = MLP()
    params = m.init(jax.random.PRNGKey(0), jnp.ones((1, 5)))["params"]
    latent = pae.chain(q.noise_injection(), q.act_noise_injection()).init(params, jax.random.PRNGKey(0))
    rng = np.random.default_rng(2)
    latent = pae.core.map_nodes(lambda n: n.replace(logits=jnp.asarray(rng.normal(size=n.logits.shape) * 3,
                                                                       jnp.float32)), latent, q.NoisyAct)
    out = q.assign_palette(jax.device_get(latent))
    for k in ("Dense_0", "Dense_1"):
        node = out[k]["act"]
        assert isinstance(node, q.QuantAct)
        pal, assigned = q.choose_palette(np.asarray(qa.act_bits(latent[k]["act"])), 1)
        np.testing.assert_array_equal(node.bits, assigned)
        assert tuple(np.unique(node.bits).astype(int)) == pal
    fixed = q.assign_palette(jax.device_get(latent), act_fixed=(2, 6))
    assert set(np.unique(fixed["Dense_1"]["act"].bits)) <= {2.0, 6.0}
    with pytest.raises(ValueError, match="outside its range"):
        q.assign_palette(jax.device_get(latent), act_fixed=(5, 6))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(6, (3, 3), strides=(1, 2), padding="SAME")(x))
        x = nn.Conv(7, (2, 3), padding=((1, 0), (2, 1)), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(37)(x))
        return nn.Dense(5)(x)


def _phase2(model, x, *, grid="auto", base=None, masks=None, seed=0, learned_range=False):
    cfg = q.QuantConfig(activations=True, act_grid=grid, act_learned_range=learned_range)
    t = q.noise_transform(cfg)
    v = model.init(jax.random.PRNGKey(seed), x)
    params = v["params"]
    if masks is not None:
        params = pae.sparsity.attach_masks(params, masks)
        params = pae.core.map_nodes(lambda n: n.replace(weight=n.weight * n.mask), params,
                                    pae.sparsity.FixedMask)
        t = pae.chain(base, t)
    latent = t.init(params, jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(seed + 2)

    def widths(n):
        nonlocal key
        key, sub = jax.random.split(key)
        return n.replace(logits=jax.random.normal(sub, n.logits.shape) * 3.0)

    latent = pae.core.map_nodes(widths, latent, (q.NoisyWeight, q.NoisyAct))
    first = "Conv_0" if "Conv_0" in latent else "Dense_0"    # one level for its inputs
    node = latent[first]["act"]
    latent[first]["act"] = node.replace(logits=jnp.full_like(node.logits, -1.0))
    if learned_range:
        latent = pae.core.map_nodes(lambda n: n.replace(log_scale=n.log_scale - 0.3), latent, q.NoisyAct)
    stats = q.with_act_stats(v.get("batch_stats", {}), latent)
    wrapped = q.quantize_activations(model)
    ctx = pae.Context.make(key=3)

    @jax.jit                                 # one program, not one eager dispatch per op
    def update(latent, stats, xb):
        _, upd = wrapped.apply({"params": t.apply(latent, ctx), "batch_stats": stats}, xb, train=True,
                               mutable=["batch_stats"])
        return upd["batch_stats"]

    for i in range(3):                       # running statistics from a few noisy training batches
        stats = update(latent, stats, x * (1.0 + 0.2 * i))
    return q.assign_palette(jax.device_get(latent)), jax.device_get(stats)


def _reference(model, latent, stats, x, base=None):
    fine = q.palette_quantizer() if base is None else pae.chain(base, q.palette_quantizer())
    wrapped = q.quantize_activations(model)
    return jax.jit(lambda lat, s, x: wrapped.apply({"params": fine.apply(lat, None), "batch_stats": s},
                                                   x, train=False))(latent, stats, x)


@pytest.mark.parametrize("model_kind,grid,learned", [("conv", "auto", False), ("conv", "symmetric", True),
                                                     ("dense", "unsigned", False)])
def test_export_with_activations_equals_phase_two(model_kind, grid, learned):
    model = ConvNet() if model_kind == "conv" else MLP()
    x = (jax.random.normal(jax.random.PRNGKey(0), (6, 9, 11, 3)) if model_kind == "conv"
         else jax.random.normal(jax.random.PRNGKey(0), (6, 5)))
    latent, stats = _phase2(model, x, grid=grid, learned_range=learned)
    ref = _reference(model, latent, stats, x)
    ex = q.export(q.quantize_activations(model), latent, stats)
    got = jax.jit(ex.apply)(ex.tree, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    # the activations are really quantized: without them the logits differ
    no_act = dict(ex.tree, acts={})
    assert np.abs(np.asarray(jax.jit(ex.apply)(no_act, x)) - np.asarray(ref)).max() > 1e-4
    acts = ex.tree["acts"]
    assert set(acts) == set(qa.act_paths(latent))
    first = "Conv_0" if "Conv_0" in latent else "Dense_0"
    assert len(np.unique(acts[first]["bits"])) == 1                           # a one-level layer
    assert any(len(np.unique(a["bits"])) == 2 for a in acts.values())         # both segments used
    for path, a in acts.items():                                              # the stored quantizer
        s = stats
        for k in path.split("/"):
            s = s[k]
        s = jax.tree.map(np.asarray, s["act"])
        r = s["ema"] / (1 - 0.9 ** s["count"])
        node = latent
        for k in path.split("/"):
            node = node[k]
        node = node["act"]
        if learned:
            r = r * np.exp(np.asarray(node.log_scale))
        unsigned = {"unsigned": np.ones_like(r, bool), "symmetric": np.zeros_like(r, bool),
                    "auto": s["min"] >= 0}[grid]
        delta, o = np_grid(np.asarray(node.bits, np.float64), r, unsigned)
        np.testing.assert_allclose(a["scale"], delta, rtol=1e-5)
        np.testing.assert_allclose(a["offset"], o)
        np.testing.assert_array_equal(a["bits"], np.asarray(node.bits).astype(np.uint8))
    # the running statistics left the tree; the quantizer is counted as "acts"
    assert not [p for p in pae.core.select.leaf_paths(ex.tree["batch_stats"]) if "/act/" in f"/{p}/"]
    size = q.size_bytes(ex)
    c = sum(qa.act_paths(latent).values())
    assert size["acts"] == 9 * c                                              # uint8 + 2 float32 per channel
    assert size["total"] == sum(np.asarray(a).nbytes for a in jax.tree.leaves(ex.tree))


def test_save_load_round_trip(tmp_path):
    model = ConvNet()
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 9, 11, 3))
    latent, stats = _phase2(model, x, seed=4)
    ex = q.export(model, latent, stats)
    path = tmp_path / "model.pae"
    q.save_exported(str(path), ex)
    back = q.load_exported(str(path), model)
    np.testing.assert_array_equal(np.asarray(back.apply(back.tree, x)), np.asarray(ex.apply(ex.tree, x)))
    flat_a = jax.tree_util.tree_flatten_with_path(ex.tree)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(back.tree)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, a), (_, b) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype
    assert q.size_bytes(back) == q.size_bytes(ex)
    bad = tmp_path / "other.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a file written by save_exported"):
        q.load_exported(str(bad), model)


def test_export_after_sparsity_keeps_pruned_weights_zero():
    model = ConvNet()
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 9, 11, 3))
    params = model.init(jax.random.PRNGKey(5), x)["params"]
    rng = np.random.default_rng(5)
    masks = {p: (rng.random(np.shape(w)) > 0.6).astype(np.float32)
             for p, w in zip(pae.core.select.leaf_paths(params), jax.tree.leaves(params)) if p.endswith("kernel")}
    base = pae.sparsity.fixed_masks()
    # no 8-bit level: a masked layer stores b + 1 bits (the exact zero is one more code)
    latent, stats = _phase2(model, x, base=base, masks=masks, seed=5)
    latent = pae.core.map_nodes(lambda n: n.replace(bits=jnp.minimum(n.bits, 7.0),
                                                    levels=jnp.minimum(n.levels, 7.0)), latent, q.QuantWeight)
    ref = _reference(model, latent, stats, x, base=base)
    ex = q.export(model, latent, stats)
    got = jax.jit(ex.apply)(ex.tree, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    for path, layer in ex.tree["layers"].items():
        packed = layer.packed[0]
        w = np.asarray(pk.dequantize(packed))          # rows in the kernel's (Cin, kh, kw) order
        m = masks[path]
        m_rows = np.moveaxis(m, -2, 0).reshape(-1, m.shape[-1]) if m.ndim > 2 else m
        assert np.all(w[m_rows == 0] == 0.0)                                   # pruned: exactly zero
        assert np.all(w[m_rows != 0] != 0.0)                                   # kept: mid-rise levels
        assert tuple(s.bits for s in packed.segments) == tuple(
            container_bits(b + 1) for b in layer.bits)
    # an 8-bit level cannot take the extra code
    eight = pae.core.map_nodes(lambda n: n.replace(bits=jnp.full_like(n.bits, 8.0)), latent, q.QuantWeight)
    with pytest.raises(ValueError, match="masked"):
        q.export(model, eight, stats)


def test_chain_after_sparsity_on_the_engine_learns_and_exports():
    from pae.train import init_state, make_task, train_phases
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 8)) * 1.5

    def split(n):
        y = rng.integers(0, 3, n)
        return (means[y] + rng.normal(size=(n, 8))).astype(np.float32), y.astype(np.int32)

    task = make_task(MLP(), {"train": split(384), "test": split(128)})
    cfg = q.QuantConfig(noise_epochs=6, finetune_epochs=1, lr=1e-2, bits_lr=0.05, target_bits=3.0,
                        activations=True, act_target_bits=4.0, high=(4, 7), seed=0)
    plain = init_state(task.model, task.example, 0)
    masks = {"Dense_0/kernel": (rng.random((8, 9)) > 0.5).astype(np.float32),
             "Dense_1/kernel": (rng.random((9, 3)) > 0.3).astype(np.float32)}
    ticket = pae.sparsity.attach_masks(jax.device_get(plain.params), masks)
    state = plain.replace(params=q.noise_transform(cfg).init(ticket, jax.random.PRNGKey(0)))
    wide = dataclasses.replace(cfg, high=(4, 8))      # a masked layer is exported with b + 1 bits
    with pytest.raises(ValueError, match=r"masked \(sparse\) kernels.*levels must be <= 7.*high=\(4, 7\)"):
        train_phases(task, q.quant_phases(wide, model=task.model, base=pae.sparsity.fixed_masks()),
                     state, batch_size=64, callbacks=[lambda row, s: pytest.fail("trained an epoch")])
    res = train_phases(task, q.quant_phases(cfg, model=task.model, base=pae.sparsity.fixed_masks()),
                       state, batch_size=64)
    noise = res.rows("noise")
    assert noise[-1]["train_loss"] < 0.7 * noise[0]["train_loss"]
    assert noise[-1]["act_bits"] == pytest.approx(4.0, abs=0.4)              # the activation budget
    assert noise[0]["act_bits"] > 5.0
    assert res.last("finetune")["test_acc"] > 0.8
    latent = jax.device_get(res.state.params)
    assert isinstance(latent["Dense_0"]["kernel"], pae.sparsity.FixedMask)
    ex = q.export(task.model, latent, res.state.batch_stats)
    xt = jnp.asarray(split(40)[0])
    ref = _reference(task.model, latent, res.state.batch_stats, xt, base=pae.sparsity.fixed_masks())
    np.testing.assert_allclose(ex.apply(ex.tree, xt), ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_packing_pads_k_never_truncates():
    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3)(x)

    m = Wide()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 601))          # K = 601: no tile divides it
    latent, stats = _phase2(m, x, seed=7)
    ex = q.export(m, latent, stats)
    packed = ex.tree["layers"]["Dense_0/kernel"].packed[0]
    assert packed.k == 601 and sum(s.k for s in packed.segments) == 601
    w = np.asarray(pk.dequantize(packed))
    assert w.shape == (601, 3)
    want = np.asarray(q.quantize_params(latent)["Dense_0"]["kernel"])
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)
    ref = _reference(m, latent, stats, x)
    np.testing.assert_allclose(ex.apply(ex.tree, x), ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    with pytest.raises(ValueError, match="k_tile"):
        q.export(m, latent, stats, k_tile=100)


def test_bad_input_is_refused_naming_the_argument():
    for kwargs, match in (({"act_target_bits": 3.0}, "activations=True"),
                          ({"activations": True, "act_b_init": 9.0}, "^act b_init must lie"),
                          ({"activations": True, "act_lmbda": -1.0}, "^act lmbda must be >= 0"),
                          ({"activations": True, "act_target_bits": 0.5}, "act target_bits"),
                          ({"activations": True, "act_grid": "x"}, "^act_grid must be one of"),
                          ({"activations": True, "act_momentum": 1.0}, "^act_momentum must be"),
                          ({"palette": (3,)}, r"^palette: fixed must hold 2 level"),
                          ({"activations": True, "act_palette": (5, 6)}, "act_palette"),
                          ({"activations": True, "act_b_max": 9.0}, "act b_max")):
        with pytest.raises(ValueError, match=match):
            q.QuantConfig(**kwargs)
    with pytest.raises(ValueError, match="needs model="):
        q.quant_phases(q.QuantConfig(activations=True))
    m = MLP()
    x = jnp.ones((2, 5))
    params = m.init(jax.random.PRNGKey(0), x)["params"]
    with pytest.raises(ValueError, match="matches no leaf"):
        q.act_noise_injection(pae.select.path("Nothing")).init(params, None)
    with pytest.raises(ValueError, match="ndim >= 2"):
        q.act_noise_injection(pae.select.path("bias")).init(params, None)
    with pytest.raises(TypeError, match="flax.linen Module"):
        q.quantize_activations(lambda x: x)

    class Depthwise(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Conv(8, (3, 3), feature_group_count=8)(x)

    dw, xi = Depthwise(), jnp.ones((1, 5, 5, 8))
    dw_latent = q.act_noise_injection().init(dw.init(jax.random.PRNGKey(0), xi)["params"], None)
    with pytest.raises(ValueError, match=r"'Conv_0' is a grouped conv \(feature_group_count=8"):
        q.quantize_activations(dw).apply({"params": q.quantize_params(dw_latent),
                                          "batch_stats": q.with_act_stats({}, dw_latent)}, xi)
    latent, stats = _phase2(m, x, seed=1)
    with pytest.raises(ValueError, match="no running statistics"):
        q.quantize_activations(m).apply({"params": q.quantize_params(latent)}, x)
    with pytest.raises(ValueError, match="'Dense_1'.*no running"):
        q.export(m, latent, {"Dense_0": stats["Dense_0"]})
    bad = jax.tree.map(lambda a: a, stats)
    bad["Dense_0"]["act"] = dict(bad["Dense_0"]["act"], ema=np.full(5, np.nan, np.float32))
    with pytest.raises(ValueError, match="'Dense_0/act/ema' has NaN or Inf"):
        q.export(m, latent, bad)
    bad["Dense_0"]["act"] = dict(stats["Dense_0"]["act"], min=np.full(5, np.nan, np.float32))
    with pytest.raises(ValueError, match="Dense_0/act/min holds NaN"):
        q.export(m, latent, bad)
    bad["Dense_0"]["act"] = dict(stats["Dense_0"]["act"], count=np.zeros((), np.float32))
    with pytest.raises(ValueError, match="'Dense_0' were never updated"):
        q.export(m, latent, bad)
    assert q.act_noise_injection(momentum=np.float32(0.9)) is not None       # a NumPy scalar is a number
    with pytest.raises(ValueError, match="momentum"):
        q.act_noise_injection(momentum=True)
    over = dict(latent, Dense_1=dict(latent["Dense_1"], act=latent["Dense_1"]["act"].replace(
        bits=jnp.full((9,), 9.0))))
    with pytest.raises(ValueError, match="activation bits of 'Dense_1'"):
        q.export(m, over, stats)
    phase1 = q.act_noise_injection().init(params, None)
    mixed = dict(latent, Dense_0=dict(latent["Dense_0"], act=phase1["Dense_0"]["act"]))
    with pytest.raises(ValueError, match="'Dense_0/act' is a NoisyAct"):
        q.export(m, mixed, stats)


def test_resume_with_activations_across_the_transition_is_exact(tmp_path):
    from pae.train import init_state, make_task, train_phases
    rng = np.random.default_rng(3)
    x = rng.normal(size=(128, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
    task = make_task(MLP(), {"train": (x, y), "test": (x[:32], y[:32])})
    cfg = q.QuantConfig(noise_epochs=1, finetune_epochs=1, activations=True, act_target_bits=4.0)
    state = init_state(task.model, task.example, 0, q.noise_transform(cfg).init)
    train_phases(task, q.quant_phases(cfg, model=task.model), state, batch_size=64,
                 checkpoint_dir=tmp_path)
    longer = dataclasses.replace(cfg, finetune_epochs=2)
    # the engine replays both transitions (statistics added, palette) to restore the structure
    resumed = train_phases(task, q.quant_phases(longer, model=task.model), state, batch_size=64,
                           checkpoint_dir=tmp_path, extend_last_phase=True)
    full = train_phases(task, q.quant_phases(longer, model=task.model), state, batch_size=64)
    assert [r["phase"] for r in resumed.history] == ["noise", "finetune", "finetune"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((resumed.state.params, resumed.state.batch_stats)),
                 jax.device_get((full.state.params, full.state.batch_stats)))
    assert float(full.state.batch_stats["Dense_1"]["act"]["count"]) == 6       # 3 epochs x 2 steps
