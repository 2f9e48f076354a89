"""Structured growth on bottleneck ResNets (the ImageNet ResNet-50 layout): the gate algebra against a
NumPy forward pass, FLOPs and parameters against hand counts, extraction and compaction against the
gated net, and the experiment's ResNet-50 preset."""
import dataclasses
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from pae.core import Context, select
from pae.growth import extraction as pe, flops as pf, structured as ps
from pae.models import CifarResNet, ResNet
from pae.models.slim import SlimBottleneckResNet
from pae.train import TrainState, make_task, train_phases

EPS = 1e-5
#: stem 3; stage 0 (stream 8): blocks 0 (projection) and 1 (identity); stage 1 (stream 12, stride 2):
#: blocks 2 (projection) and 3 (identity); inner widths differ per block and per conv
TINY = SlimBottleneckResNet(3, (8, 12), ((0, 0, 2, 3), (1, 0, 3, 2), (2, 1, 4, 5), (3, 1, 2, 2)), 5)


def numpy_variables(model, x, seed=0):
    """Random ``{"params", "batch_stats"}`` of ``model`` drawn with NumPy (He-scaled kernels, BatchNorm
    affine parameters and statistics away from 0 and 1): no initializer is compiled."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed + 7)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.5, leaf.shape).astype(np.float32)

    out = jax.tree_util.tree_map_with_path(draw, shapes)
    return {"params": out["params"], "batch_stats": out.get("batch_stats", {})}


def numpy_state(model, x, seed, init_latent=None):
    """What ``init_state`` returns, with the variables of :func:`numpy_variables` (the eager
    initializers compile one program per kernel shape, which dominates a tiny test's time)."""
    v = numpy_variables(model, x, seed)
    params = v["params"] if init_latent is None else init_latent(v["params"], None)
    return TrainState(step=np.zeros((), np.int32), params=params, batch_stats=v["batch_stats"],
                      opt_state=None, key=np.asarray(jax.random.PRNGKey(seed)))


def random_logits(spec, rng, p_on=0.5):
    ch = {g: (np.where(rng.uniform(size=n) < p_on, 1, -1) * rng.uniform(0.2, 2.0, n)).astype(np.float32)
          for g, n in spec.groups}
    bl = {b.name: np.asarray(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 2.0), np.float32)
          for b in spec.blocks}
    return {"channels": ch, "blocks": bl}


@pytest.fixture(scope="module")
def tiny():
    x = np.random.default_rng(2).normal(size=(5, 8, 8, 3)).astype(np.float32)
    v = numpy_variables(TINY, x, seed=3)
    return x, ps.gate_spec(TINY, x), SimpleNamespace(params=v["params"], batch_stats=v["batch_stats"])


# ----------------------------------------------------------------------------- NumPy reference

def np_conv(x, kernel, stride=1):
    """A bias-free conv with symmetric padding ``k // 2`` (as pae.models.init.conv)."""
    k = kernel.shape[0]
    p = k // 2
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    out = np.zeros((n, ho, wo, kernel.shape[-1]))
    for dy in range(k):
        for dx in range(k):
            patch = xp[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
            out += np.einsum("nhwi,io->nhwo", patch, kernel[dy, dx])
    return out


def np_maxpool3s2(x):
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return np.max([xp[:, dy:dy + 2 * (ho - 1) + 1:2, dx:dx + 2 * (wo - 1) + 1:2]
                   for dy in range(3) for dx in range(3)], axis=0)


def np_bottleneck_net(model, p, s, x, ch, bl, train):
    """The gated net written out: channel c of a gated layer outputs ``m_c * BN(conv(x))_c``; a gated
    block computes ``relu(x + g * m_stream * BN2(...))``."""
    def bn(z, bp, bs, gate):
        mean, var = (z.mean((0, 1, 2)), z.var((0, 1, 2))) if train else (bs["mean"], bs["var"])
        return gate * ((z - mean) / np.sqrt(var + EPS) * bp["scale"] + bp["bias"])

    x = x.astype(np.float64)
    x = np.maximum(bn(np_conv(x, p["Conv_0"]["kernel"], 2), p["BatchNorm_0"], s["BatchNorm_0"], ch["stem"]), 0)
    x = np_maxpool3s2(x)
    previous = None
    for index, stage, _, _ in model.blocks:
        name = f"Bottleneck_{index}"
        q, r = p[name], s[name]
        first = stage != previous
        stride = 2 if first and stage > 0 else 1
        previous = stage
        y = np.maximum(bn(np_conv(x, q["Conv_0"]["kernel"]), q["BatchNorm_0"], r["BatchNorm_0"],
                          ch[f"{name}/Conv_0"]), 0)
        y = np.maximum(bn(np_conv(y, q["Conv_1"]["kernel"], stride), q["BatchNorm_1"], r["BatchNorm_1"],
                          ch[f"{name}/Conv_1"]), 0)
        y = bn(np_conv(y, q["Conv_2"]["kernel"]), q["BatchNorm_2"], r["BatchNorm_2"], ch[f"stream{stage}"])
        if first:
            short = bn(np_conv(x, q["shortcut_conv"]["kernel"], stride), q["shortcut_bn"], r["shortcut_bn"],
                       ch[f"stream{stage}"])
        else:
            short, y = x, bl[name] * y
        x = np.maximum(short + y, 0)
    return x.mean((1, 2)) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


# ----------------------------------------------------------------------------- models and layout

def test_slim_bottleneck_is_resnet_at_full_width():
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    full = ResNet((1, 2), True, 7)
    variables = numpy_variables(full, x)
    slim = SlimBottleneckResNet.like(full)
    shapes = jax.eval_shape(slim.init, jax.random.PRNGKey(0), x)
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    assert [a.shape for a in jax.tree.leaves(shapes)] == [a.shape for a in jax.tree.leaves(variables)]
    for train in (False, True):
        a = full.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
        b = slim.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
        a, b = (a[0], b[0]) if train else (a, b)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_resnet50_layout_flops_and_params():
    """ResNet-50 at 224x224: the torchvision parameter count exactly, and the conv + FC
    multiply-accumulates of an independent count over the architecture."""
    model = ResNet((3, 4, 6, 3), True, 1000)
    spec = ps.gate_spec(model, np.zeros((1, 224, 224, 3), np.float32))
    assert spec.kind == "bottleneck"
    assert pf.full_cost(spec, "params") == 25_557_032
    macs, size, cin = 112 * 112 * 49 * 3 * 64, 56, 64          # stem at 112x112, pool to 56x56
    for stage, n in enumerate((3, 4, 6, 3)):
        mid, out = 64 * 2 ** stage, 256 * 2 ** stage
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            o = size // stride
            macs += size * size * cin * mid + o * o * 9 * mid * mid + o * o * mid * out
            if b == 0:
                macs += o * o * cin * out
            size, cin = o, out
    macs += 2048 * 1000
    assert pf.full_cost(spec) == macs
    assert 4.08e9 < macs < 4.10e9                                 # the usual "4.1 GFLOPs"
    assert spec.ungated_blocks == (1, 1, 1, 1) and len(spec.blocks) == 12
    assert dict(spec.groups)["stem"] == 64 and dict(spec.groups)["stream3"] == 2048
    assert pe.slim_model(spec, {}) == SlimBottleneckResNet.like(model)


@pytest.mark.parametrize("train", [False, True])
def test_gate_algebra_matches_numpy(tiny, train):
    x, spec, state = tiny
    rng = np.random.default_rng(4 + train)
    ch = {g: rng.uniform(0, 1.5, n).astype(np.float32) for g, n in spec.groups}
    ch["stream0"][3] = 0.0
    ch["Bottleneck_2/Conv_1"][1] = 0.0
    bl = {b.name: np.float32(rng.uniform(0, 1.5)) for b in spec.blocks}
    bl["Bottleneck_3"] = np.float32(0)
    params = jax.jit(lambda p, c, b: ps.gate_params(spec, p, c, b))(state.params, ch, bl)
    variables = {"params": params, "batch_stats": state.batch_stats}
    out = TINY.apply(variables, x, train=True, mutable=["batch_stats"])[0] if train else \
        TINY.apply(variables, x)
    ref = np_bottleneck_net(TINY, jax.tree.map(np.asarray, state.params),
                            jax.tree.map(np.asarray, state.batch_stats), x, ch, bl, train)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert [b.name for b in spec.blocks] == ["Bottleneck_1", "Bottleneck_3"]
    assert dict(spec.groups) == {"stem": 3, "Bottleneck_0/Conv_0": 2, "Bottleneck_0/Conv_1": 3,
                                 "stream0": 8, "Bottleneck_1/Conv_0": 3, "Bottleneck_1/Conv_1": 2,
                                 "Bottleneck_2/Conv_0": 4, "Bottleneck_2/Conv_1": 5, "stream1": 12,
                                 "Bottleneck_3/Conv_0": 2, "Bottleneck_3/Conv_1": 2}


def test_flops_and_params_hand_counted():
    spec = ps.gate_spec(TINY, np.zeros((1, 16, 16, 3), np.float32))
    # stem at 8x8: 64*49*3*3 = 28224; pool to 4x4 (16 positions); stage 1 at 2x2 (4 positions)
    # block0 (in 3): conv0 16*3*2 = 96, conv1 16*9*2*3 = 864, conv2 16*3*8 = 384, shortcut 16*3*8 = 384
    # block1 (in 8): conv0 16*8*3 = 384, conv1 16*9*3*2 = 864, conv2 16*2*8 = 256
    # block2 (in 8, stride on the 3x3): conv0 16*8*4 = 512, conv1 4*9*4*5 = 720, conv2 4*5*12 = 240,
    #   shortcut (stride 2) 4*8*12 = 384
    # block3 (in 12): conv0 4*12*2 = 96, conv1 4*9*2*2 = 144, conv2 4*2*12 = 96; fc 12*5 = 60
    full = (28224 + 96 + 864 + 384 + 384 + 384 + 864 + 256 + 512 + 720 + 240 + 384 + 96 + 144 + 96 + 60)
    assert pf.full_cost(spec) == full
    on = lambda n, k: np.array([1.0] * k + [0.0] * (n - k))  # noqa: E731
    ch = {"stem": on(3, 2), "stream0": on(8, 5), "stream1": on(12, 7), "Bottleneck_0/Conv_1": on(3, 1),
          "Bottleneck_2/Conv_0": on(4, 3), "Bottleneck_3/Conv_1": on(2, 0)}
    # stem 64*49*3*2 = 18816; block0 conv0 16*2*2 = 64, conv1 16*9*2*1 = 288, conv2 16*1*5 = 80,
    # shortcut 16*2*5 = 160; block1 off; block2 conv0 16*5*3 = 240, conv1 4*9*3*5 = 540,
    # conv2 4*5*7 = 140, shortcut 4*5*7 = 140; block3 conv0 4*7*2 = 56, conv1 0, conv2 0; fc 7*5 = 35
    assert float(pf.cost(spec, ch, {"Bottleneck_1": 0.0, "Bottleneck_3": 1.0})) == \
        18816 + 64 + 288 + 80 + 160 + 240 + 540 + 140 + 140 + 56 + 35
    # parameters: kernel * in * out, + 2 per BatchNorm channel (all on), + the FC bias
    params = (49 * 3 * 3 + 6 + 3 * 2 + 4 + 9 * 2 * 3 + 6 + 3 * 8 + 16 + 3 * 8 + 16
              + 8 * 3 + 6 + 9 * 3 * 2 + 4 + 2 * 8 + 16
              + 8 * 4 + 8 + 9 * 4 * 5 + 10 + 5 * 12 + 24 + 8 * 12 + 24
              + 12 * 2 + 4 + 9 * 2 * 2 + 4 + 2 * 12 + 24 + 12 * 5 + 5)
    assert pf.full_cost(spec, "params") == params
    n = sum(np.size(v) for v in jax.tree.leaves(
        jax.eval_shape(TINY.init, jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)))["params"]))
    assert n == params


def test_gate_leaves_and_fixed_residual_width_selector(tiny):
    """Stream gates hit every Conv_2's BatchNorm and the projection's shortcut_bn, block gates the
    branch's last BatchNorm, inner gates BatchNorm_0/1; kernels are untouched. Selecting only the
    inner convs gates the inner widths and blocks and leaves stem and residual widths fixed."""
    x, spec, state = tiny
    rng = np.random.default_rng(5)
    ch = {g: rng.uniform(0, 2, n).astype(np.float32) for g, n in spec.groups}
    bl = {b.name: np.float32(rng.uniform(0, 2)) for b in spec.blocks}
    o = jax.tree.map(np.asarray, ps.gate_params(spec, state.params, ch, bl))
    p = jax.tree.map(np.asarray, state.params)
    for leaf in ("scale", "bias"):
        np.testing.assert_allclose(o["BatchNorm_0"][leaf], p["BatchNorm_0"][leaf] * ch["stem"], rtol=1e-6)
        np.testing.assert_allclose(o["Bottleneck_2"]["shortcut_bn"][leaf],
                                   p["Bottleneck_2"]["shortcut_bn"][leaf] * ch["stream1"], rtol=1e-6)
        np.testing.assert_allclose(o["Bottleneck_2"]["BatchNorm_2"][leaf],
                                   p["Bottleneck_2"]["BatchNorm_2"][leaf] * ch["stream1"], rtol=1e-6)
        np.testing.assert_allclose(o["Bottleneck_3"]["BatchNorm_2"][leaf],
                                   p["Bottleneck_3"]["BatchNorm_2"][leaf] * ch["stream1"] * bl["Bottleneck_3"],
                                   rtol=1e-6)
        for conv in (0, 1):
            np.testing.assert_allclose(o["Bottleneck_1"][f"BatchNorm_{conv}"][leaf],
                                       p["Bottleneck_1"][f"BatchNorm_{conv}"][leaf]
                                       * ch[f"Bottleneck_1/Conv_{conv}"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves_with_path(o), jax.tree_util.tree_leaves_with_path(p)):
        if a[0][-1].key == "kernel":
            np.testing.assert_array_equal(a[1], b[1])
    t = ps.structured_sparsification(spec, channels=select.path(r"Bottleneck_\d+/Conv_[01]/kernel"))
    latent = t.init(state.params, None)
    assert sorted(latent.logits["channels"]) == sorted(g for g, _ in spec.groups if g.startswith("Bottleneck"))
    assert sorted(latent.logits["blocks"]) == ["Bottleneck_1", "Bottleneck_3"]


# ----------------------------------------------------------------------------- extraction

def test_extraction_equals_gated_with_disabled_channels_and_blocks(tiny):
    x, spec, state = tiny
    t = ps.structured_sparsification(spec)
    for seed in range(2):
        logits = random_logits(spec, np.random.default_rng(10 + seed))
        logits["blocks"]["Bottleneck_1"] = np.float32(-1)
        logits["blocks"]["Bottleneck_3"] = np.float32(1)
        logits["channels"]["Bottleneck_3/Conv_1"][:] = -1      # an active block with no 3x3 channel
        latent = ps.Gated(state.params, logits)
        gated = TINY.apply({"params": t.apply(latent, Context.make(train=False)),
                            "batch_stats": state.batch_stats}, x)
        ex = pe.extract(spec, latent, state.batch_stats)
        np.testing.assert_allclose(ex.model.apply(ex.variables, x), gated, rtol=2e-5, atol=2e-5)
        assert [b[0] for b in ex.model.blocks] == [0, 2, 3] and "Bottleneck_1" not in ex.variables["params"]
        assert ex.model.stem == max(1, int((logits["channels"]["stem"] > 0).sum()))
        for s in range(2):
            assert ex.model.streams[s] == max(1, int((logits["channels"][f"stream{s}"] > 0).sum()))
        assert ex.model.blocks[1][2:] == (max(1, int((logits["channels"]["Bottleneck_2/Conv_0"] > 0).sum())),
                                          max(1, int((logits["channels"]["Bottleneck_2/Conv_1"] > 0).sum())))
    # no group empty: the extracted net's parameters and FLOPs are the counted ones
    logits = random_logits(spec, np.random.default_rng(20), p_on=0.7)
    for g in logits["channels"]:
        logits["channels"][g][0] = 1.0
    latent = ps.Gated(state.params, logits)
    ex = pe.extract(spec, latent, state.batch_stats)
    gated = TINY.apply({"params": t.finalize(latent, None), "batch_stats": state.batch_stats}, x)
    np.testing.assert_allclose(ex.model.apply(ex.variables, x), gated, rtol=2e-5, atol=2e-5)
    n = sum(np.size(v) for v in jax.tree.leaves(ex.variables["params"]))
    assert n == float(pf.cost(spec, *ps.hard_gates(logits), "params"))
    assert pf.full_cost(ps.gate_spec(ex.model, x)) == float(pf.cost(spec, *ps.hard_gates(logits)))


def test_extraction_rejects_inconsistent_residual_sets(tiny):
    x, spec, state = tiny
    masks = {"Bottleneck_2/Conv_2": np.arange(12) != 4, "Bottleneck_2/shortcut_conv": np.arange(12) != 5}
    with pytest.raises(ValueError, match=r"inconsistent residual channel sets in group 'stream1'.*"
                                         r"Bottleneck_2/Conv_2.*Bottleneck_2/shortcut_conv"):
        pe.extract_masked(spec, state.params, state.batch_stats, masks)
    # a disabled block's Conv_2 does not take part
    masks = {"Bottleneck_1/Conv_2": np.arange(8) != 2}
    ex = pe.extract_masked(spec, state.params, state.batch_stats, masks, {"Bottleneck_1": False})
    assert ex.model.streams == (8, 12)


def test_bad_input():
    x = np.zeros((1, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="bottleneck"):
        ps.gate_spec(ResNet((1, 1), False, 3), x)
    with pytest.raises(ValueError, match="bottleneck=True"):
        SlimBottleneckResNet.like(CifarResNet(8, 3))
    with pytest.raises(ValueError, match="each of the 2 stages"):
        SlimBottleneckResNet(3, (8, 12), ((0, 0, 2, 2),), 5).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="mid1 of block 1"):
        SlimBottleneckResNet(3, (8, 12), ((0, 0, 2, 2), (1, 1, 2, 0)), 5).init(jax.random.PRNGKey(0), x)
    spec = ps.gate_spec(TINY, x)
    with pytest.raises(ValueError, match="no gateable layer"):
        ps.structured_sparsification(spec, channels=select.path("nothing"), blocks=False)


# ----------------------------------------------------------------------------- compaction

def test_compaction_then_training_equals_masked_full_size_training():
    """1 epoch full size, compaction to fixed widths, 1 more on the slim bottleneck net == the same
    2 epochs full size with the dropped channels held off (momentum carried in both)."""
    from pae.train import Phase
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8, 8, 3)).astype(np.float32)
    y = (x[:, :4, :, 0].mean((1, 2)) > 0).astype(np.int32)
    model = SlimBottleneckResNet(3, (6,), ((0, 0, 3, 3), (1, 0, 3, 3)), 2)     # one stage, 2 blocks
    spec = ps.gate_spec(model, x[:1])
    cfg = ps.StructuredConfig(epochs=2, lr=0.05, mask_lr=0.5, lmbda=5.0, beta_final=4.0, budget=0.5,
                              weight_decay=1e-3, seed_width=0.5)
    widths = {"stem": 2, "stream0": 4, "Bottleneck_0/Conv_1": 2, "Bottleneck_1/Conv_0": 2}
    task = make_task(model, {"train": (x[:32], y[:32]), "test": (x[32:], y[32:])})
    state = numpy_state(model, x[:1], 0, cfg.transform(spec).init)
    compacted = ps.structured_phases(cfg, spec, compactions=[(1, widths)])
    assert isinstance(compacted[1].model, SlimBottleneckResNet)
    a = train_phases(task, compacted, state, batch_size=8, log=lambda s: None)
    kept = {}

    def hold_off(st, snaps):
        ch = {}
        for g, s in st.params.logits["channels"].items():
            s = np.asarray(s)
            if g in widths:
                kept[g] = np.sort(np.argsort(-s, kind="stable")[:widths[g]])
                s = np.where(np.isin(np.arange(len(s)), kept[g]), s, -1e4).astype(np.float32)
            ch[g] = s
        return st.replace(params=st.params.replace(logits={**st.params.logits, "channels": ch}))

    first = compacted[0]
    oracle = [first, Phase("search1", 1, compacted[1].optimizer, first.transform, compacted[1].context,
                           hold_off, eval_every=1, metrics=first.metrics, optimizer_state="keep")]
    b = train_phases(task, oracle, state, batch_size=8, log=lambda s: None)
    for ra, rb in zip(a.history, b.history):
        np.testing.assert_allclose(ra["train_loss"], rb["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(ra["test_loss"], rb["test_loss"], rtol=1e-4)
    la, lb = a.state.params, b.state.params
    for g, s in la.logits["channels"].items():
        ref = np.asarray(lb.logits["channels"][g])
        np.testing.assert_allclose(s, ref[kept.get(g, np.arange(len(ref)))], rtol=1e-4, atol=1e-5)
    for layer in spec.layers:
        wa, wb = la.weights, lb.weights
        for k in layer.path.split("/"):
            wa, wb = wa[k], wb[k]
        ref = np.asarray(wb["kernel"])
        if layer.in_group in kept:
            ref = np.take(ref, kept[layer.in_group], axis=-2)
        if layer.out_group in kept:
            ref = np.take(ref, kept[layer.out_group], axis=-1)
        np.testing.assert_allclose(wa["kernel"], ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- experiment

def test_experiment_resnet50_preset_and_tiny_bottleneck_search(load_script):
    """--paper imagenet-resnet50 builds ResNet-50 with the ImageNet flags; the experiment's tiny
    bottleneck net searches one epoch on digits on its compacted form (restructured at epoch 0 to the
    seed plus a margin) and extracts exactly; its FLOPs-matched baselines (uniform thinning, network
    slimming's global BN-scale threshold) are built from the bottleneck layout."""
    from pae.data import load_dataset
    gs = load_script("grow_structured")
    args = gs.resolve(gs.build_parser().parse_args(["--paper", "imagenet-resnet50"]))
    assert args.models == ["imagenet-resnet50"] and args.dataset == "imagenet2012"
    assert (args.epochs, args.batch_size, args.budget) == (90, 256, 0.5)
    assert gs._model(args, "imagenet-resnet50", 1000) == ResNet((3, 4, 6, 3), True, 1000)
    assert gs.resolve(gs.build_parser().parse_args(["--paper", "imagenet-resnet50", "--epochs", "60"])).epochs == 60

    data = load_dataset("digits")
    model = gs.MODELS["bneck-t"](data.num_classes)
    train, test = data["train"], data["test"]
    data = dataclasses.replace(data, splits={"train": train.subset(np.arange(96)),
                                             "test": test.subset(np.arange(64))})
    task = make_task(model, data, eval_splits=("test",))
    x = np.asarray(data.example_inputs(), np.float32)
    spec = ps.gate_spec(model, x)
    assert spec.kind == "bottleneck" and [b.name for b in spec.blocks] == ["Bottleneck_1"]
    cfg = ps.StructuredConfig(epochs=1, lr=0.05, mask_lr=1.0, lmbda=5.0, beta_final=2.0, weight_decay=0.0)
    state = numpy_state(model, x, 0, cfg.transform(spec).init)
    out = ps.structured_search(task, cfg, spec, state, batch_size=32, restructure_at=(0,), margin=0.25)
    w = out.widths[0][1]
    assert w == ps.margin_widths(spec, state.params, 0.25) and w["stream0"] < dict(spec.groups)["stream0"]
    row = out.history[-1]
    assert 0 < row["flops"] <= row["width_flops"] < 1 and np.isfinite(row["train_loss"])
    xt = np.asarray(test.take(np.arange(64))["inputs"], np.float32)
    st = out.state
    gated = jax.jit(out.spec.model.apply)({"params": cfg.transform(out.spec, reference=spec).apply(
        st.params, Context.make(train=False)), "batch_stats": st.batch_stats}, xt)
    ex = pe.extract(out.spec, st.params, st.batch_stats)
    np.testing.assert_allclose(jax.jit(ex.model.apply)(ex.variables, xt), gated, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pf.full_cost(ps.gate_spec(ex.model, x)) / pf.full_cost(spec), row["flops"],
                               rtol=1e-5)
    full = pf.full_cost(spec)
    thin, widths, fraction = gs.uniform_nearest(spec, 0.5)
    assert isinstance(thin, SlimBottleneckResNet) and abs(fraction - 0.5) < 0.1
    assert pf.full_cost(ps.gate_spec(thin, x)) / full == pytest.approx(fraction, rel=1e-6)
    assert set(widths) == set(spec.group_sizes)
    masks = gs.slimming_masks(spec, numpy_variables(model, x)["params"], 0.5)
    assert set(masks) == set(spec.group_sizes)
    assert 0.3 < float(pf.cost(spec, {g: m.astype(np.float32) for g, m in masks.items()}, {})) / full <= 0.5
