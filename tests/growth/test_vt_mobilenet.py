"""Growing MobileNetV1 (depthwise-separable blocks): pairs through the depthwise convs, variance
transfer (factor 1 on depthwise kernels, the fan-in ratio on pointwise ones), the peers, the
optimizer state and the LR scales; NumPy references written independently of the implementation."""
import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from pae import growth
from pae.models.growable import GrowableMobileNetV1, mobilenet_v1_widths

MODEL = GrowableMobileNetV1(5, (4, 6, 8), (1, 2, 1))        # stem, block0, block1
TO = {"stem": 8, "block0": 10, "block1": 12}
TO2 = {"stem": 10, "block0": 12, "block1": 16}
ODD_TO = {"stem": 7, "block0": 9, "block1": 12}


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _np_factor(n, m, rule):
    return {"sqrt": (n / m) ** 0.5, "linear": n / m, "none": 1.0}[rule]


def _old(old, new):
    m = np.zeros(np.shape(new), bool)
    m[tuple(slice(0, s) for s in np.shape(old))] = True
    return m


def test_default_is_mobilenet_v1_with_its_parameter_count():
    """ImageNet MobileNetV1 (1000 classes): 4,231,976 trainable parameters (Keras' count, as
    pae.models.MobileNetV1); 14 groups; a depthwise entry per block in the spec."""
    model = GrowableMobileNetV1(1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32)))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"])) == 4_231_976
    assert list(model.groups().values()) == [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    spec = model.growth_spec()
    assert sum(layer.depthwise for layer in spec) == 13 and len(spec) == 1 + 2 * 13 + 1
    assert shapes["params"]["b12"]["dw"]["kernel"].shape == (3, 3, 1, 1024)
    assert mobilenet_v1_widths(0.25)[:3] == (8, 16, 32)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_pairs_through_depthwise_convs_preserve_the_function(train, images, g):
    state = g.perturbed_state(MODEL, images)
    grown = growth.grow(state, MODEL, TO, jax.random.PRNGKey(3), vt="none")
    wide = MODEL.at_widths(TO)
    before, after = g.logits(MODEL, state, images, train), g.logits(wide, grown, images, train)
    assert np.abs(before).max() > 0.1
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    p = _flat(grown.params)
    for blk, n, m in (("b0", 4, 8), ("b1", 6, 10)):
        dw = p[f"{blk}/dw/kernel"]
        h = (m - n) // 2
        assert dw.shape == (3, 3, 1, m) and np.abs(dw[..., n:]).min() > 0
        np.testing.assert_array_equal(dw[..., n:n + h], dw[..., n + h:])      # tied filters
        pw = p[f"{blk}/pw/kernel"]
        np.testing.assert_array_equal(pw[:, :, n:n + h], -pw[:, :, n + h:])   # opposite rows


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
def test_depthwise_factor_is_one_pointwise_factor_is_the_fan_in_ratio(rule, images, g):
    old_w = MODEL.groups()
    state = g.perturbed_state(MODEL, images, seed=1)
    grown = growth.grow(state, MODEL, TO, jax.random.PRNGKey(0), vt=rule)
    p0, p1 = _flat(state.params), _flat(grown.params)
    s0, s1 = _flat(state.batch_stats), _flat(grown.batch_stats)
    checks = [("stem", None, "stem", 1.0)]
    prev = "stem"
    for i in range(2):
        checks.append((f"b{i}/dw", prev, prev, 1.0))        # fan-in 3*3: no rescaling
        checks.append((f"b{i}/pw", prev, f"block{i}", _np_factor(old_w[prev], TO[prev], rule)))
        prev = f"block{i}"
    for path, gin, gout, c in checks:
        w0, w1 = p0[path + "/kernel"], p1[path + "/kernel"]
        n_o = old_w[gout]
        n_i = 1 if path.endswith("dw") else (old_w[gin] if gin else w0.shape[-2])
        np.testing.assert_allclose(w1[..., :n_i, :n_o], c * w0, rtol=1e-6)
        bn = path + "_bn"
        np.testing.assert_allclose(s1[bn + "/mean"][:n_o], c * s0[bn + "/mean"], rtol=1e-6)
        np.testing.assert_allclose(s1[bn + "/var"][:n_o], c * c * s0[bn + "/var"], rtol=1e-6)
        np.testing.assert_array_equal(s1[bn + "/var"][n_o:], 1)
        np.testing.assert_array_equal(p1[bn + "/scale"][:n_o], p0[bn + "/scale"])
    c = _np_factor(8, 12, rule)
    np.testing.assert_allclose(p1["fc/kernel"][:8], c * p0["fc/kernel"], rtol=1e-6)
    assert c < 1 and _np_factor(6, 10, rule) < 1
    # every conv is normalized: in train mode only the classifier changes, logits * c (up to BN eps)
    wide = MODEL.at_widths(TO)
    np.testing.assert_allclose(g.logits(wide, grown, images, True), c * g.logits(MODEL, state, images, True),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rule,std", [("he", np.sqrt(2 / 9)), ("mup", 1 / 9)])
def test_new_depthwise_filters_use_the_depthwise_fan_in(rule, std, images, g):
    model = GrowableMobileNetV1(5, (4, 6), (1, 1))
    state = g.perturbed_state(model, images)
    grown = growth.grow(state, model, {"stem": 84, "block0": 6}, jax.random.PRNGKey(0), new_init=rule)
    new = _flat(grown.params)["b0/dw/kernel"][..., 4:44]     # one filter of each pair: 40 x 9 draws
    assert abs(new.std() / std - 1) < 0.15


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_net2net_copies_depthwise_filters_whole(train, images, g):
    state = g.perturbed_state(MODEL, images, seed=4)
    tx = optax.sgd(0.1, momentum=0.9)
    state = state.replace(opt_state=tx.init(state.params))
    grown = growth.vt.grow_net2net(state, MODEL, ODD_TO, jax.random.PRNGKey(2), tx=tx, noise=0.0)
    wide = MODEL.at_widths(ODD_TO)
    np.testing.assert_allclose(g.logits(wide, grown, images, train), g.logits(MODEL, state, images, train),
                               rtol=1e-5, atol=1e-5)
    p0, p1 = _flat(state.params), _flat(grown.params)
    src = np.array([int(np.flatnonzero(p0["stem_bn/scale"] == v)[0]) for v in p1["stem_bn/scale"]])
    np.testing.assert_array_equal(p1["b0/dw/kernel"], p0["b0/dw/kernel"][..., src])     # not divided
    cnt = np.bincount(src, minlength=4)[src]
    np.testing.assert_allclose(p1["b0/pw/kernel"][..., :6], p0["b0/pw/kernel"][:, :, src] / cnt[:, None],
                               rtol=1e-6)


def test_gradmax_new_depthwise_filters_are_identity(images, g):
    state = g.perturbed_state(MODEL, images, seed=5)
    tx = optax.adam(1e-3)
    state = state.replace(opt_state=tx.init(state.params))
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), state.params)
    grown = growth.vt.grow_gradmax(state, MODEL, ODD_TO, jax.random.PRNGKey(0), grads, tx=tx, fan_in=0.0)
    wide = MODEL.at_widths(ODD_TO)
    for train in (False, True):
        np.testing.assert_allclose(g.logits(wide, grown, images, train), g.logits(MODEL, state, images, train),
                                   rtol=1e-5, atol=1e-5)
    p0, p1, gr = _flat(state.params), _flat(grown.params), _flat(grads)
    delta = np.zeros((3, 3, 1, 3))
    delta[1, 1] = 1
    np.testing.assert_array_equal(p1["b0/dw/kernel"][..., 4:], delta)
    np.testing.assert_array_equal(p1["b0/dw/kernel"][..., :4], p0["b0/dw/kernel"])
    assert not p1["stem/kernel"][..., 4:].any()
    # the pointwise conv after the depthwise one reads the new channels with the gradient's top
    # right singular vectors (|.|, as (n_i, n_o) for a 1x1 kernel) at 0.5 x the mean old row norm
    w0 = p0["b0/pw/kernel"][0, 0]
    vt = np.linalg.svd(gr["b0/pw/kernel"][0, 0].astype(np.float64))[2][:3]
    target = 0.5 * np.linalg.norm(w0, axis=1).mean()
    np.testing.assert_allclose(np.abs(p1["b0/pw/kernel"][0, 0, 4:, :6]), np.abs(target * vt), rtol=1e-4, atol=1e-6)
    other = growth.vt.grow_gradmax(state, MODEL, ODD_TO, jax.random.PRNGKey(0), grads, tx=tx, depthwise="fan_in")
    new = _flat(other.params)["b0/dw/kernel"][..., 4:]
    assert 0 < np.abs(new).max() < 0.01 * np.sqrt(2 / 9) * 5
    with pytest.raises(ValueError, match="depthwise must be one of"):
        growth.vt.grow_gradmax(state, MODEL, ODD_TO, jax.random.PRNGKey(0), grads, tx=tx, depthwise="zero")


@pytest.mark.parametrize("new_moments", ["warm", "zeros"])
def test_optimizer_state_and_birth_map_of_depthwise_kernels(new_moments, images, g):
    tx = optax.chain(optax.adam(1e-2), growth.scale_by_birth_stage())
    state = g.perturbed_state(MODEL, images)
    rng = np.random.default_rng(0)
    opt = tx.init(state.params)
    for _ in range(3):
        grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), state.params)
        _, opt = tx.update(grads, opt, state.params)
    state = state.replace(opt_state=opt)
    grown = growth.grow(state, MODEL, TO, jax.random.PRNGKey(0), tx=tx, new_moments=new_moments)
    adam0, adam1 = _flat(state.opt_state[0][0].mu), _flat(grown.opt_state[0][0].mu)
    nu0, nu1 = _flat(state.opt_state[0][0].nu), _flat(grown.opt_state[0][0].nu)
    params = _flat(grown.params)
    for k in params:
        old = _old(adam0[k], adam1[k])
        assert adam1[k].shape == nu1[k].shape == params[k].shape
        np.testing.assert_array_equal(adam1[k][old], adam0[k].ravel())
        np.testing.assert_array_equal(nu1[k][old], nu0[k].ravel())
        np.testing.assert_array_equal(adam1[k][~old], 0)
        np.testing.assert_allclose(nu1[k][~old], nu0[k].mean() if new_moments == "warm" else 0, rtol=1e-6)
    dw = "b1/dw/kernel"
    assert adam1[dw].shape == (3, 3, 1, 10) and (~_old(adam0[dw], adam1[dw]))[..., 6:].all()
    birth = _flat(grown.opt_state[1].birth)
    np.testing.assert_array_equal(birth[dw], np.where(np.arange(10) < 6, 0, 1) * np.ones((3, 3, 1, 1), int))
    np.testing.assert_array_equal(birth["b1/pw/kernel"][0, 0],
                                  np.where((np.arange(10)[:, None] < 6) & (np.arange(12) < 8), 0, 1))


def test_lr_scales_of_depthwise_kernels_against_numpy(images, g):
    lra = growth.scale_by_birth_stage()
    tx = optax.chain(optax.sgd(0.1, 0.9), lra)
    state = g.perturbed_state(MODEL, images)
    state = state.replace(opt_state=tx.init(state.params))
    state = growth.grow(state, MODEL, TO, jax.random.PRNGKey(0), tx=tx)
    state = growth.grow(state, MODEL.at_widths(TO), TO2, jax.random.PRNGKey(1), tx=tx)
    u = jax.tree.map(lambda p: np.random.default_rng(1).normal(size=np.shape(p)).astype(np.float32), state.params)
    out, new_state = jax.jit(lra.update)(u, state.opt_state[1], state.params)
    p, scale, upd, uu = _flat(state.params), _flat(new_state.scale), _flat(out), _flat(u)
    # depthwise kernel of block 1 reads the block0 group: 6 -> 10 -> 12 channels
    w = p["b1/dw/kernel"].astype(np.float64)
    stage = np.repeat([0, 1, 2], [6, 4, 2])
    norm = {t: np.sqrt((w[..., stage == t] ** 2).sum()) for t in range(3)}
    want = np.broadcast_to(np.array([norm[t] / norm[0] for t in stage]), w.shape)
    np.testing.assert_allclose(scale["b1/dw/kernel"], want, rtol=1e-5)
    np.testing.assert_allclose(upd["b1/dw/kernel"], uu["b1/dw/kernel"] * want, rtol=1e-5)
    assert len(np.unique(np.round(want, 6))) == 3
    np.testing.assert_array_equal(scale["b1/dw_bn/scale"], 1)       # not a kernel: lr_0


def test_bad_depthwise_spec_and_layout_fail_clearly(images, g):
    state = g.perturbed_state(MODEL, images)

    class Broken(GrowableMobileNetV1):
        def growth_spec(self):
            spec = list(super().growth_spec())
            spec[1] = spec[1]._replace(out_group="block0")          # b0/dw: stem -> block0
            return tuple(spec)

    broken = Broken(5, (4, 6, 8), (1, 2, 1))
    with pytest.raises(ValueError, match="depthwise, which needs in_group == out_group"):
        growth.grow(state, broken, TO, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="strides must be 3 ints"):
        GrowableMobileNetV1(5, (4, 6, 8), (1, 2)).groups()
    with pytest.raises(ValueError, match="even number"):
        growth.grow(state, MODEL, ODD_TO, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="alpha must be"):
        mobilenet_v1_widths(0)


def test_experiment_counts_depthwise_macs_and_accepts_mobilenet(load_script):
    """forward_macs of the experiment's mobilenet_tiny on 8x8x1 digits against a count by hand: a
    depthwise conv costs H_out W_out * 9 * C (not * C * C)."""
    script = load_script("grow_vt")
    model = script.MODELS["mobilenet_tiny"](10)              # (8, 16, 32, 32), strides (1, 1, 2, 1)
    want = (8 * 8 * 9 * 1 * 8                                 # stem 3x3, 1 -> 8, 8x8
            + 8 * 8 * 9 * 8 + 8 * 8 * 8 * 16                  # b0: dw 8 at 8x8, pw 8 -> 16
            + 4 * 4 * 9 * 16 + 4 * 4 * 16 * 32                # b1: dw 16 stride 2 -> 4x4, pw 16 -> 32
            + 4 * 4 * 9 * 32 + 4 * 4 * 32 * 32                # b2: dw 32, pw 32 -> 32
            + 32 * 10)                                        # fc
    assert script.forward_macs(model, np.zeros((1, 8, 8, 1), np.float32)) == want
    small = model.at_widths({"stem": 4, "block0": 8, "block1": 16, "block2": 16})
    assert script.forward_macs(small, np.zeros((1, 8, 8, 1), np.float32)) == (
        64 * 9 * 4 + 64 * 9 * 4 + 64 * 4 * 8 + 16 * 9 * 8 + 16 * 8 * 16 + 16 * 9 * 16 + 16 * 16 * 16 + 160)
    args = script.resolve(script.build_parser().parse_args(["--model", "mobilenet_v1"]))
    assert args.model == "mobilenet_v1" and isinstance(script.MODELS[args.model](10), GrowableMobileNetV1)
