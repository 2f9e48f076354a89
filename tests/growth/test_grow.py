"""pae.growth.grow: function-preserving pairs, variance transfer, BatchNorm statistics, new-weight
laws, bad input; NumPy references written independently of the implementation."""
import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from pae import growth
from pae.models.growable import GrowableResNet, GrowableVGG

RESNET = GrowableResNet(8, 5, (4, 6, 8))
RESNET_TO = {"stage0": 4, "stage1": 10, "stage2": 12}     # stage0 does not grow
VGG = GrowableVGG((4, "M", 6, 8, "M"), 5)
VGG_TO = {"conv0": 8, "conv1": 6, "conv2": 12}
CASES = {"resnet": (RESNET, RESNET_TO), "vgg": (VGG, VGG_TO)}


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_pairs_preserve_the_function_before_rescaling(name, train, images, g):
    model, widths = CASES[name]
    state = g.perturbed_state(model, images)
    grown = growth.grow(state, model, widths, jax.random.PRNGKey(3), vt="none")
    wide = model.at_widths(widths)
    before, after = g.logits(model, state, images, train), g.logits(wide, grown, images, train)
    assert np.abs(before).max() > 0.1
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    # the grown net is really wider, and its new units are not all zero
    k = _flat(grown.params)["fc/kernel"]
    assert k.shape[0] == 12 and np.abs(k[8:]).min() > 0


def _np_factor(n, m, rule):
    return {"sqrt": (n / m) ** 0.5, "linear": n / m, "none": 1.0}[rule]


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_blocks_factors_and_statistics_against_numpy(name, rule, images, g):
    model, widths = CASES[name]
    old_w = model.groups()
    state = g.perturbed_state(model, images, seed=1)
    grown = growth.grow(state, model, widths, jax.random.PRNGKey(0), vt=rule)
    p0, p1 = _flat(state.params), _flat(grown.params)
    s0, s1 = _flat(state.batch_stats), _flat(grown.batch_stats)
    for layer in model.growth_spec():
        path = "/".join(layer.kernel)
        w0, w1 = p0[path + "/kernel"], p1[path + "/kernel"]
        n_i = m_i = w0.shape[-2]
        n_o = m_o = w0.shape[-1]
        if layer.in_group:
            n_i, m_i = old_w[layer.in_group], widths[layer.in_group]
        if layer.out_group:
            n_o, m_o = old_w[layer.out_group], widths[layer.out_group]
        c = _np_factor(n_i, m_i, rule)
        assert w1.shape == w0.shape[:-2] + (m_i, m_o)
        np.testing.assert_allclose(w1[..., :n_i, :n_o], c * w0, rtol=1e-6)
        hi, ho = (m_i - n_i) // 2, (m_o - n_o) // 2
        # new outputs in pairs: identical incoming weights over the whole new input width
        np.testing.assert_array_equal(w1[..., n_o:n_o + ho], w1[..., n_o + ho:])
        # new inputs in pairs: opposite outgoing weights to every output, the corner included
        np.testing.assert_array_equal(w1[..., n_i:n_i + hi, :], -w1[..., n_i + hi:, :])
        if path + "/bias" in p0:
            b0, b1 = p0[path + "/bias"], p1[path + "/bias"]
            np.testing.assert_allclose(b1[:n_o], c * b0, rtol=1e-6)
            np.testing.assert_array_equal(b1[n_o:], 0)
        if layer.norm:
            bn = "/".join(layer.norm)
            np.testing.assert_allclose(s1[bn + "/mean"][:n_o], c * s0[bn + "/mean"], rtol=1e-6)
            np.testing.assert_allclose(s1[bn + "/var"][:n_o], c * c * s0[bn + "/var"], rtol=1e-6)
            np.testing.assert_array_equal(s1[bn + "/mean"][n_o:], 0)
            np.testing.assert_array_equal(s1[bn + "/var"][n_o:], 1)
            np.testing.assert_array_equal(p1[bn + "/scale"][:n_o], p0[bn + "/scale"])
            np.testing.assert_array_equal(p1[bn + "/scale"][n_o:], 1)
            np.testing.assert_array_equal(p1[bn + "/bias"][:n_o], p0[bn + "/bias"])
            np.testing.assert_array_equal(p1[bn + "/bias"][n_o:], 0)
    assert set(p1) == set(p0) and set(s1) == set(s0)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("rule", ["sqrt", "linear"])
def test_variance_transfer_keeps_normalized_layers_and_scales_the_classifier(rule, train, images, g):
    """A VGG's convs are all followed by BatchNorm: only the classifier (no normalization after it)
    changes, by exactly its factor c, up to BatchNorm's epsilon."""
    state = g.perturbed_state(VGG, images, seed=2)
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(5), vt=rule)
    c = _np_factor(8, 12, rule)
    before, after = g.logits(VGG, state, images, train), g.logits(VGG.at_widths(VGG_TO), grown, images, train)
    np.testing.assert_allclose(after, c * before, rtol=2e-4, atol=2e-4)
    assert np.abs(after - before).max() > 0.01          # the change is real


def test_variance_transfer_changes_the_resnet_through_its_unnormalized_shortcuts(images, g):
    state = g.perturbed_state(RESNET, images, seed=2)
    wide = RESNET.at_widths(RESNET_TO)
    grown = growth.grow(state, RESNET, RESNET_TO, jax.random.PRNGKey(5), vt="sqrt")
    before, after = g.logits(RESNET, state, images, False), g.logits(wide, grown, images, False)
    c_fc = _np_factor(8, 12, "sqrt")
    # not a pure classifier temperature: the rescaled 1x1 shortcuts change the features
    assert np.abs(after - c_fc * before).max() > 1e-3


@pytest.mark.parametrize("rule", ["he", "mup", "empirical"])
def test_new_weights_follow_their_law(rule, images, g):
    model = GrowableVGG((16, 32), 3)
    state = g.perturbed_state(model, images)
    grown = growth.grow(state, model, {"conv0": 16, "conv1": 64}, jax.random.PRNGKey(0), new_init=rule)
    w0, w1 = _flat(state.params)["conv1/kernel"], _flat(grown.params)["conv1/kernel"]
    new = w1[..., 32:48]                                 # the first half of the new outputs: i.i.d.
    fan_in = 9 * 16
    want = {"he": (2 / fan_in) ** 0.5, "mup": 1 / fan_in, "empirical": w0.std()}[rule]
    assert abs(new.std() / want - 1) < 0.1
    assert abs(new.mean()) < 0.2 * want


def test_growth_is_deterministic_and_keyed(images, g):
    state = g.perturbed_state(VGG, images)
    a = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(1))
    b = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(1))
    c = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(2))
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    assert not np.array_equal(a.params["fc"]["kernel"], c.params["fc"]["kernel"])
    assert growth.grow(state, VGG, VGG.at_widths(VGG_TO), jax.random.PRNGKey(1)).params["fc"]["kernel"].shape == (12, 5)


def test_bad_input_fails_clearly(images, g):
    state = g.perturbed_state(VGG, images)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="new_widths: widths may only grow.*conv1"):
        growth.grow(state, VGG, {"conv1": 4}, key)
    with pytest.raises(ValueError, match="model_to: widths may only grow"):
        growth.grow(state, VGG, VGG.at_widths({"conv0": 2, "conv1": 6, "conv2": 8}), key)
    with pytest.raises(ValueError, match="new_widths: every width must grow by an even number.*conv2"):
        growth.grow(state, VGG, {"conv2": 11}, key)
    for bad in (12.9, "12", True):       # never truncated or cast to a width
        with pytest.raises(ValueError, match="new_widths must be ints"):
            growth.grow(state, VGG, {"conv2": bad}, key)
    with pytest.raises(ValueError, match="new_widths names groups \\['conv9'\\]"):
        growth.grow(state, VGG, {"conv9": 12}, key)
    with pytest.raises(TypeError, match="model_to must be a GrowableVGG"):
        growth.grow(state, VGG, GrowableResNet(8, 5, (4, 6, 8)), key)
    with pytest.raises(ValueError, match="vt must be one of"):
        growth.grow(state, VGG, VGG_TO, key, vt="cube")
    with pytest.raises(ValueError, match="is state from model_from"):
        growth.grow(state, VGG.at_widths(VGG_TO), VGG_TO, key)
    adam = optax.adam(1e-3)
    with_adam = state.replace(opt_state=adam.init(state.params))
    with pytest.raises(ValueError, match="tx is required"):
        growth.grow(with_adam, VGG, VGG_TO, key)
    with pytest.raises(ValueError, match="does not match tx.init"):
        growth.grow(with_adam, VGG, VGG_TO, key, tx=optax.sgd(0.1, 0.9))


def test_new_weights_are_drawn_on_the_host_without_compiling(images, g, monkeypatch):
    """No jax.random draw (one compiled program per new shape) inside grow; a typed key and its raw
    uint32 data give the same draws; the draws are a pure function of (key, layer)."""
    state = g.perturbed_state(RESNET, images)
    ref = growth.grow(state, RESNET, RESNET_TO, jax.random.PRNGKey(7))

    def boom(*a, **k):
        raise AssertionError("grow called jax.random.normal")
    monkeypatch.setattr(jax.random, "normal", boom)
    typed = growth.grow(state, RESNET, RESNET_TO, jax.random.key(7))
    jax.tree.map(np.testing.assert_array_equal, typed.params, ref.params)
    a = growth.vt.host_rng(jax.random.PRNGKey(7), 3).standard_normal(5)
    b = growth.vt.host_rng(jax.random.PRNGKey(7), 4).standard_normal(5)
    c = growth.vt.host_rng(jax.random.PRNGKey(8), 3).standard_normal(5)
    np.testing.assert_array_equal(a, growth.vt.host_rng(jax.random.PRNGKey(7), 3).standard_normal(5))
    assert not np.allclose(a, b) and not np.allclose(a, c)
    with pytest.raises(TypeError, match="key must be a jax PRNG key"):
        growth.grow(state, RESNET, RESNET_TO, np.float32(1.0))


def test_vt_factor_against_numpy_and_bad_widths():
    for n, m in ((4, 4), (4, 6), (3, 17), (np.int64(8), 10)):
        for rule in ("sqrt", "linear", "none"):
            assert growth.vt_factor(n, m, rule) == pytest.approx(_np_factor(int(n), m, rule), rel=1e-12)
    for old, new in ((0, 4), (4, 0), (-4, 8), (8, 4)):
        with pytest.raises(ValueError, match="1 <= old <= new"):
            growth.vt_factor(old, new)
    for old, new, bad in ((4.5, 6, "old"), (4, 6.0, "new"), (True, 6, "old"), (4, "6", "new")):
        with pytest.raises(TypeError, match=f"{bad} must be an int"):
            growth.vt_factor(old, new, "linear")


def _schedule_sgd():
    return optax.sgd(optax.linear_schedule(0.1, 0.0, 100))


@pytest.mark.parametrize("method", ["grow", "net2net", "gradmax"])
@pytest.mark.parametrize("make", [lambda: optax.sgd(0.1), _schedule_sgd], ids=["sgd", "sgd_schedule"])
def test_plain_sgd_state_grows_to_a_fresh_state_with_its_count_kept(method, make, images, g):
    """Nothing parameter-shaped (no momentum): the grown state is tx.init(grown params) with the
    schedule's step count carried (it was refused, which stopped vt_phases(lra=False) at stage 1)."""
    tx = make()
    state = g.perturbed_state(VGG, images)
    opt = tx.init(state.params)
    grads = jax.tree.map(np.ones_like, state.params)
    for _ in range(3):
        _, opt = tx.update(grads, opt, state.params)
    state, key = state.replace(opt_state=opt), jax.random.PRNGKey(0)
    if method == "grow":
        grown = growth.grow(state, VGG, VGG_TO, key, tx=tx)
    elif method == "net2net":
        grown = growth.vt.grow_net2net(state, VGG, VGG_TO, key, tx=tx)
    else:
        grown = growth.vt.grow_gradmax(state, VGG, VGG_TO, key, grads, tx=tx)
    fresh = tx.init(grown.params)
    assert jax.tree.structure(grown.opt_state) == jax.tree.structure(fresh)
    counts = jax.tree.leaves(grown.opt_state)
    assert [int(c) for c in counts] == ([3] if make is _schedule_sgd else [])
    _, after = tx.update(jax.tree.map(np.ones_like, grown.params), grown.opt_state, grown.params)
    assert [int(c) for c in jax.tree.leaves(after)] == ([4] if make is _schedule_sgd else [])


# ---- the ablation's peers: Net2Net-style copying and GradMax-style growth --------------------------

ODD_TO = {"resnet": {"stage0": 5, "stage1": 9, "stage2": 12}, "vgg": {"conv0": 7, "conv1": 6, "conv2": 11}}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_net2net_copies_units_and_splits_their_fan_out(name, train, images, g):
    model, _ = CASES[name]
    widths = ODD_TO[name]                                   # copying needs no pairs: odd increments
    state = g.perturbed_state(model, images, seed=4)
    tx = optax.sgd(0.1, momentum=0.9)
    state = state.replace(opt_state=tx.init(state.params))
    grown = growth.vt.grow_net2net(state, model, widths, jax.random.PRNGKey(2), tx=tx, noise=0.0)
    wide = model.at_widths(widths)
    np.testing.assert_allclose(g.logits(wide, grown, images, train), g.logits(model, state, images, train),
                               rtol=1e-5, atol=1e-5)
    # NumPy reference of every kernel from the source maps read off the grown BatchNorm scales
    old_w = model.groups()
    p0, p1 = _flat(state.params), _flat(grown.params)
    src = {}
    for layer in model.growth_spec():
        if layer.norm and layer.out_group not in src:
            s0, s1 = p0["/".join(layer.norm) + "/scale"], p1["/".join(layer.norm) + "/scale"]
            src[layer.out_group] = np.array([int(np.flatnonzero(s0 == v)[0]) for v in s1])
    for gname, s in src.items():
        np.testing.assert_array_equal(s[:old_w[gname]], np.arange(old_w[gname]))
        assert len(s) == widths[gname] and s.max() < old_w[gname]
    for layer in model.growth_spec():
        path = "/".join(layer.kernel) + "/kernel"
        w0 = p0[path]
        si = src[layer.in_group] if layer.in_group else np.arange(w0.shape[-2])
        so = src[layer.out_group] if layer.out_group else np.arange(w0.shape[-1])
        cnt = np.bincount(si, minlength=w0.shape[-2])[si]
        want = np.take(np.take(w0, si, axis=-2), so, axis=-1) / cnt[:, None]
        np.testing.assert_allclose(p1[path], want, rtol=1e-6)
    # momentum: old entries carried, new ones zero
    k0, k1 = state.opt_state[0].trace["fc"]["kernel"], grown.opt_state[0].trace["fc"]["kernel"]
    assert k1.shape == p1["fc/kernel"].shape and not np.asarray(k1)[np.asarray(k0).shape[0]:].any()
    # noise breaks the copies' symmetry on their incoming weights only
    noisy = growth.vt.grow_net2net(state, model, widths, jax.random.PRNGKey(2), tx=tx, noise=0.1)
    n1 = _flat(noisy.params)
    last = "/".join(model.growth_spec()[-2].kernel) + "/kernel"
    n_o = p0[last].shape[-1]
    np.testing.assert_array_equal(n1[last][..., :n_o], p1[last][..., :n_o])
    assert np.abs(n1[last][..., n_o:] - p1[last][..., n_o:]).max() > 0


def test_gradmax_fan_out_is_the_gradients_top_singular_vectors(images, g):
    """fan_in=0: the function is preserved exactly (train and eval); every reader's new rows are the
    top right singular vectors of its kernel gradient (as (n_i, kh*kw*n_o)) scaled to 0.5 x the mean
    old fan-out norm, up to sign; new fan-in columns zero; Adam state zero-padded."""
    model, widths = VGG, ODD_TO["vgg"]
    state = g.perturbed_state(model, images, seed=5)
    tx = optax.adam(1e-3)
    state = state.replace(opt_state=tx.init(state.params))
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), state.params)
    grown = growth.vt.grow_gradmax(state, model, widths, jax.random.PRNGKey(0), grads, tx=tx, fan_in=0.0)
    wide = model.at_widths(widths)
    for train in (False, True):
        np.testing.assert_allclose(g.logits(wide, grown, images, train),
                                   g.logits(model, state, images, train), rtol=1e-5, atol=1e-5)
    p0, p1, gr = _flat(state.params), _flat(grown.params), _flat(grads)
    old_w = model.groups()
    for layer in model.growth_spec():
        path = "/".join(layer.kernel) + "/kernel"
        w0, w1 = p0[path], p1[path]
        n_i, n_o = w0.shape[-2:]
        if layer.out_group:
            assert not w1[..., n_o:].any()
        if not layer.in_group or widths[layer.in_group] == old_w[layer.in_group]:
            continue
        k = widths[layer.in_group] - n_i
        m = np.moveaxis(gr[path].astype(np.float64), -2, 0).reshape(n_i, -1)
        vt = np.linalg.svd(m)[2][:k]
        target = 0.5 * np.mean([np.linalg.norm(np.take(w0, i, axis=-2)) for i in range(n_i)])
        got = np.moveaxis(w1[..., n_i:, :n_o], -2, 0).reshape(k, -1)
        r = min(k, n_i)
        np.testing.assert_allclose(np.abs(got[:r]), np.abs(target * vt[:r]), rtol=1e-4, atol=1e-6)
        assert not got[r:].any()
    for mu0, mu1 in zip(jax.tree.leaves(state.opt_state[0].mu), jax.tree.leaves(grown.opt_state[0].mu)):
        assert np.shape(mu1) != () and not np.asarray(mu1)[~_old_mask(mu0, mu1)].any()
    # the default small random fan-in wakes the new units (not all zero) but stays small
    awake = _flat(growth.vt.grow_gradmax(state, model, widths, jax.random.PRNGKey(0), grads, tx=tx).params)
    new_in = awake["conv2/kernel"][..., 8:]
    assert 0 < np.abs(new_in).max() < 0.1 * np.abs(p0["conv2/kernel"]).max()


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_gradmax_new_rows_beyond_the_gradients_rank_are_zero(rank, images, g):
    """conv1 grows 6 -> 10 (4 new rows); a gradient of rank 0, 1 or 2 gives exactly that many
    non-zero new rows (np.linalg.matrix_rank of the float32 gradient), each the right singular
    vector of NumPy's SVD up to sign."""
    model, widths = VGG, {"conv1": 10}
    state = g.perturbed_state(model, images, seed=6)
    rng = np.random.default_rng(rank)
    grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), state.params)
    n_i, n_o = 6, 8                                          # conv2 reads conv1: (3, 3, 6, 8)
    m = sum(np.outer(rng.normal(size=n_i), rng.normal(size=9 * n_o)) for _ in range(rank)) \
        if rank else np.zeros((n_i, 9 * n_o))
    gk = np.moveaxis(m.reshape(n_i, 3, 3, n_o), 0, -2).astype(np.float32)
    grads["conv2"]["kernel"] = gk
    assert np.linalg.matrix_rank(np.moveaxis(gk, -2, 0).reshape(n_i, -1)) == rank
    grown = growth.vt.grow_gradmax(state, model, widths, jax.random.PRNGKey(0), grads, fan_in=0.0)
    w0 = _flat(state.params)["conv2/kernel"]
    got = np.moveaxis(_flat(grown.params)["conv2/kernel"][..., n_i:, :], -2, 0).reshape(4, -1)
    norms = np.linalg.norm(got, axis=1)
    assert (norms[:rank] > 0).all() and not got[rank:].any()
    target = 0.5 * np.mean([np.linalg.norm(np.take(w0, i, axis=-2)) for i in range(n_i)])
    vt = np.linalg.svd(np.moveaxis(gk.astype(np.float64), -2, 0).reshape(n_i, -1))[2][:rank]
    np.testing.assert_allclose(np.abs(got[:rank]), np.abs(target * vt), rtol=1e-4, atol=1e-6)


def _old_mask(old, new):
    m = np.zeros(np.shape(new), bool)
    m[tuple(slice(0, s) for s in np.shape(old))] = True
    return m


def test_peers_bad_input_fails_clearly(images, g):
    state = g.perturbed_state(VGG, images)
    key = jax.random.PRNGKey(0)
    grads = jax.tree.map(np.zeros_like, state.params)
    with pytest.raises(ValueError, match="new_widths: widths may only grow.*conv1"):
        growth.vt.grow_net2net(state, VGG, {"conv1": 4}, key)
    with pytest.raises(ValueError, match="new_widths: widths may only grow.*conv1"):
        growth.vt.grow_gradmax(state, VGG, {"conv1": 4}, key, grads)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        growth.vt.grow_net2net(state, VGG, VGG_TO, key, noise=-1.0)
    with pytest.raises(ValueError, match="grads must be shaped like state.params"):
        growth.vt.grow_gradmax(state, VGG, VGG_TO, key, {"fc": grads["fc"]})
    with pytest.raises(TypeError, match="grads must be a params-shaped tree"):
        growth.vt.grow_gradmax(state, VGG, VGG_TO, key, 3.0)
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match="tx is required"):
        growth.vt.grow_gradmax(state.replace(opt_state=sgd.init(state.params)), VGG, VGG_TO, key, grads)
