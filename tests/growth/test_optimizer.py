"""Optimizer state through growth (moments, Adam's warm second moment, the birth-stage map) and the
learning-rate adaptation against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from pae import growth
from pae import optim as pae_optim
from pae.models.growable import GrowableVGG

VGG = GrowableVGG((4, "M", 6, 8, "M"), 5)
VGG_TO = {"conv0": 8, "conv1": 6, "conv2": 12}
VGG_TO2 = {"conv0": 10, "conv1": 10, "conv2": 16}


def _steps(tx, state, n, seed=0):
    """``n`` updates with random gradients (the params stay: only the optimizer state moves)."""
    rng = np.random.default_rng(seed)
    opt = tx.init(state.params)
    for _ in range(n):
        grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), state.params)
        _, opt = tx.update(grads, opt, state.params)
    return state.replace(opt_state=opt)


def _old(old, new):
    """Boolean mask of the old region (leading corner) of a grown leaf."""
    m = np.zeros(np.shape(new), bool)
    m[tuple(slice(0, s) for s in np.shape(old))] = True
    return m


def _pairs(a, b):
    return zip(jax.tree.leaves(a), jax.tree.leaves(b))


@pytest.mark.parametrize("new_moments", ["warm", "zeros"])
def test_adam_and_birth_state_grow_with_the_params(new_moments, images, g):
    tx = optax.chain(optax.adam(1e-2), growth.scale_by_birth_stage())
    state = _steps(tx, g.perturbed_state(VGG, images), 3)
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx, new_moments=new_moments)
    adam0, adam1 = state.opt_state[0][0], grown.opt_state[0][0]
    assert int(adam1.count) == int(adam0.count) == 3
    for (mu0, mu1), (nu0, nu1), p in zip(_pairs(adam0.mu, adam1.mu), _pairs(adam0.nu, adam1.nu),
                                         jax.tree.leaves(grown.params)):
        old = _old(mu0, mu1)
        assert mu1.shape == nu1.shape == p.shape
        np.testing.assert_array_equal(mu1[old], np.asarray(mu0).ravel())   # carried as they were
        np.testing.assert_array_equal(nu1[old], np.asarray(nu0).ravel())
        np.testing.assert_array_equal(mu1[~old], 0)
        want = np.asarray(nu0).mean() if new_moments == "warm" else 0.0
        np.testing.assert_allclose(nu1[~old], want, rtol=1e-6)
        assert (~old).any() or p.shape == np.shape(mu0)
    birth0, birth1 = state.opt_state[1], grown.opt_state[1]
    assert int(birth0.stage) == 0 and int(birth1.stage) == 1 and bool(birth1.stale)
    for (b0, b1), (s0, s1) in zip(_pairs(birth0.birth, birth1.birth), _pairs(birth0.scale, birth1.scale)):
        old = _old(b0, b1)
        assert b1.dtype == np.int32
        np.testing.assert_array_equal(b1, np.where(old, 0, 1))
        assert s1.shape == b1.shape
    again = growth.grow(grown, VGG.at_widths(VGG_TO), VGG_TO2, jax.random.PRNGKey(1), tx=tx)
    kernel = np.asarray(again.opt_state[1].birth["conv2"]["kernel"])
    assert int(again.opt_state[1].stage) == 2 and set(np.unique(kernel)) == {0, 1, 2}
    # conv2: in conv1 6 -> 6 -> 10, out 8 -> 12 -> 16
    assert (kernel[..., :6, :8] == 0).all() and (kernel[..., :6, 8:12] == 1).all()
    assert (kernel[..., 6:, :] == 2).all() and (kernel[..., 12:] == 2).all()


def test_sgd_momentum_is_zero_padded(images, g):
    tx = optax.sgd(0.1, momentum=0.9)
    state = _steps(tx, g.perturbed_state(VGG, images), 2)
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx)
    for t0, t1 in _pairs(state.opt_state[0].trace, grown.opt_state[0].trace):
        old = _old(t0, t1)
        np.testing.assert_array_equal(t1[old], np.asarray(t0).ravel())
        np.testing.assert_array_equal(t1[~old], 0)
        assert np.abs(np.asarray(t0)).max() > 0


@pytest.mark.parametrize("new_moments", ["warm", "zeros"])
def test_warm_second_moments_avoid_oversized_first_steps(new_moments, images, g):
    """Late in training (Adam's count 1000, nu ~ E[g^2] = 1) zero moments make every new entry's
    first step ~2.5x the learning rate; the warm nu makes it ~0.1x, as the module doc says."""
    tx = optax.adam(1.0)
    state = _steps(tx, g.perturbed_state(VGG, images), 1)
    adam = state.opt_state[0]
    ones = jax.tree.map(lambda v: np.ones_like(v), adam.nu)
    state = state.replace(opt_state=(adam._replace(count=jnp.asarray(1000, jnp.int32), nu=ones),)
                          + tuple(state.opt_state[1:]))
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx, new_moments=new_moments)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), grown.params)
    updates, _ = tx.update(grads, grown.opt_state, grown.params)
    new = np.asarray(updates["conv2"]["kernel"])[..., 8:]
    # reference: one Adam step from (mu, nu) = (0, nu_new) at count 1001, b1 = 0.9, b2 = 0.999
    gnew = np.asarray(grads["conv2"]["kernel"])[..., 8:]
    nu_new = 1.0 if new_moments == "warm" else 0.0
    mhat = 0.1 * gnew / (1 - 0.9 ** 1001)
    vhat = (0.999 * nu_new + 0.001 * gnew ** 2) / (1 - 0.999 ** 1001)
    np.testing.assert_allclose(-new, mhat / (np.sqrt(vhat) + 1e-8), rtol=1e-4, atol=1e-6)
    if new_moments == "zeros":
        assert np.abs(new).min() > 2.0
    else:
        assert np.abs(new).max() < 0.6


def _np_scales(params, birth, norms, leaves):
    """Independent reference: per leaf (or summed over leaves), sqrt(sum of squares by stage)."""
    flat_p = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
    flat_b = traverse_util.flatten_dict(jax.tree.map(np.asarray, birth))
    adapted = {k for k, p in flat_p.items() if leaves == "all" or p.ndim >= 2}
    per = {k: {t: float((flat_p[k].astype(np.float64) ** 2)[flat_b[k] == t].sum()) for t in range(5)}
           for k in adapted}
    if norms == "global":
        tot = {t: sum(per[k][t] for k in adapted) for t in range(5)}
        per = {k: tot for k in adapted}
    out = {}
    for k, p in flat_p.items():
        if k not in adapted:
            out[k] = np.ones(p.shape)
            continue
        ratio = {t: np.sqrt(per[k][t] / per[k][0]) for t in range(5)}
        out[k] = np.vectorize(ratio.get)(flat_b[k])
    return traverse_util.unflatten_dict(out)


@pytest.mark.parametrize("norms,leaves", [("layer", "kernels"), ("global", "kernels"), ("layer", "all")])
def test_lr_scales_per_element_against_numpy(norms, leaves, images, g):
    lra = growth.scale_by_birth_stage(norms=norms, leaves=leaves)
    tx = optax.chain(optax.sgd(0.1, 0.9), lra)
    state = _steps(tx, g.perturbed_state(VGG, images), 1)
    state = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx)
    state = growth.grow(state, VGG.at_widths(VGG_TO), VGG_TO2, jax.random.PRNGKey(1), tx=tx)
    birth = state.opt_state[1].birth
    want = _np_scales(state.params, birth, norms, leaves)
    rng = np.random.default_rng(0)
    u = jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), state.params)
    out, new_state = jax.jit(lra.update)(u, state.opt_state[1], state.params)
    jax.tree.map(lambda s, w: np.testing.assert_allclose(s, w, rtol=1e-5), new_state.scale, want)
    jax.tree.map(lambda o, x, w: np.testing.assert_allclose(o, x * w, rtol=1e-5), out, u, want)
    k = np.asarray(new_state.scale["conv2"]["kernel"])
    assert len(np.unique(np.round(k, 6))) == 3 and not bool(new_state.stale)
    # scales are 1 before any growth
    fresh = lra.init(state.params)
    out, _ = lra.update(u, fresh, state.params)
    jax.tree.map(np.testing.assert_array_equal, out, u)


@pytest.mark.parametrize("recompute", ["growth", "step"])
def test_scales_frozen_at_growth_or_recomputed_every_step(recompute, images, g):
    lra = growth.scale_by_birth_stage(recompute=recompute)
    tx = optax.chain(optax.sgd(0.1), lra)
    state = g.perturbed_state(VGG, images)
    state = state.replace(opt_state=tx.init(state.params))
    state = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx)
    u = jax.tree.map(jnp.ones_like, state.params)
    _, s1 = lra.update(u, state.opt_state[1], state.params)
    moved = jax.tree.map(np.array, state.params)
    moved["conv2"]["kernel"][..., 8:] *= 2.0            # the stage-1 outputs of conv2 double
    _, s2 = lra.update(u, s1, moved)
    a, b = np.asarray(s1.scale["conv2"]["kernel"]), np.asarray(s2.scale["conv2"]["kernel"])
    if recompute == "growth":
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(b[..., 8:], 2 * a[..., 8:], rtol=1e-5)


def test_bad_lra_options_fail_clearly():
    with pytest.raises(ValueError, match="norms must be one of"):
        growth.scale_by_birth_stage(norms="network")
    with pytest.raises(ValueError, match="recompute must be one of"):
        growth.scale_by_birth_stage(recompute="epoch")
    lra = growth.scale_by_birth_stage()
    p = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="needs params"):
        lra.update(p, lra.init(p))


@pytest.mark.parametrize("make,field", [(lambda: optax.amsgrad(1e-3), "nu_max"),
                                        (lambda: pae_optim.avagrad(1e-3), "sqrt_nu"),
                                        (lambda: pae_optim.amsbound(1e-3), "nu_max")])
def test_other_adam_family_second_moments_are_seeded(make, field, images, g):
    tx = make()
    state = _steps(tx, g.perturbed_state(VGG, images), 2)
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx)
    found = []

    def check(old, new):
        if hasattr(old, "_fields") and field in old._fields:
            for a, b in _pairs(getattr(old, field), getattr(new, field)):
                a, b = np.asarray(a), np.asarray(b)
                want = np.sqrt((a ** 2).mean()) if field == "sqrt_nu" else a.mean()
                np.testing.assert_allclose(b[~_old(a, b)], want, rtol=1e-5)
                np.testing.assert_array_equal(b[_old(a, b)], a.ravel())
                found.append(1)
        return old
    jax.tree.map(check, state.opt_state, grown.opt_state, is_leaf=lambda x: hasattr(x, "_fields"))
    assert len(found) == len(jax.tree.leaves(state.params))


def test_rmsprop_second_moment_is_seeded(images, g):
    """RMSProp's ``nu`` has no ``mu`` beside it; its new entries get the old mean as Adam's do."""
    tx = optax.rmsprop(1e-3)
    state = _steps(tx, g.perturbed_state(VGG, images), 2)
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx)
    for a, b in _pairs(state.opt_state[0].nu, grown.opt_state[0].nu):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(b[_old(a, b)], a.ravel())
        np.testing.assert_allclose(b[~_old(a, b)], a.mean(), rtol=1e-6)


@pytest.mark.parametrize("name", ["masked", "multi_transform", "adafactor"])
def test_masked_partitioned_and_factored_states_grow_to_what_init_gives(name, images, g):
    """The grown state has ``tx.init(grown params)``'s structure and shapes: masked-out nodes and
    Adafactor's unfactored placeholders are carried, every leaf whose shape grows keeps its old
    entries in the leading corner and is zero elsewhere; the optimizer then updates it."""
    kernels = lambda p: jax.tree.map(lambda x: np.ndim(x) > 1, p)  # noqa: E731
    tx = {"masked": optax.masked(optax.adam(1e-2), kernels),
          "multi_transform": optax.multi_transform(
              {"k": optax.sgd(0.1, momentum=0.9), "o": optax.adam(1e-2)},
              lambda p: jax.tree.map(lambda x: "k" if np.ndim(x) > 1 else "o", p)),
          "adafactor": optax.adafactor(1e-2, min_dim_size_to_factor=4)}[name]
    state = _steps(tx, g.perturbed_state(VGG, images), 2)
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx, new_moments="zeros")
    want = tx.init(grown.params)
    assert jax.tree.structure(grown.opt_state) == jax.tree.structure(want)
    moved = 0
    for a, b, w in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(grown.opt_state), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert b.shape == np.shape(w) and b.dtype == a.dtype
        np.testing.assert_array_equal(b[_old(a, b)], a.ravel())
        np.testing.assert_array_equal(b[~_old(a, b)], 0)
        moved += a.shape != b.shape
    assert moved > 0
    grads = jax.tree.map(lambda p: np.ones_like(p), grown.params)
    updates, _ = tx.update(grads, grown.opt_state, grown.params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_growing_past_the_tracked_stages_is_refused(images, g):
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), growth.scale_by_birth_stage(max_stages=2))
    state = _steps(tx, g.perturbed_state(VGG, images), 1)
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx)
    assert int(grown.opt_state[1].stage) == 1 and grown.opt_state[1].max_stages == 2
    with pytest.raises(ValueError, match="max_stages=2"):
        growth.grow(grown, VGG.at_widths(VGG_TO), VGG_TO2, jax.random.PRNGKey(1), tx=tx)
