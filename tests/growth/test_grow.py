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
    with pytest.raises(ValueError, match="new_widths names groups \\['conv9'\\]"):
        growth.grow(state, VGG, {"conv9": 12}, key)
    with pytest.raises(TypeError, match="model_to must be a GrowableVGG"):
        growth.grow(state, VGG, GrowableResNet(8, 5, (4, 6, 8)), key)
    with pytest.raises(ValueError, match="vt must be one of"):
        growth.grow(state, VGG, VGG_TO, key, vt="cube")
    with pytest.raises(ValueError, match="is state from model_from"):
        growth.grow(state, VGG.at_widths(VGG_TO), VGG_TO, key)
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match="tx: state.opt_state holds no parameter-shaped moments"):
        growth.grow(state.replace(opt_state=sgd.init(state.params)), VGG, VGG_TO, key, tx=sgd)
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
