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
        moved += a.shape != b.shape
        if name == "adafactor":     # factored axes may change: test_adafactor_statistics_against_numpy
            continue
        np.testing.assert_array_equal(b[_old(a, b)], a.ravel())
        np.testing.assert_array_equal(b[~_old(a, b)], 0)
    assert moved > 0
    grads = jax.tree.map(lambda p: np.ones_like(p), grown.params)
    updates, _ = tx.update(grads, grown.opt_state, grown.params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


ADAFACTOR_CASES = {   # (model, new widths, min_dim_size_to_factor)
    # conv1 (3, 3, 4, 6) -> (3, 3, 8, 6): Adafactor's factored axes swap (in outgrows out)
    "swap": (VGG, VGG_TO, 4),
    # conv1 (3, 3, 2, 8) -> (3, 3, 6, 8): unfactored (second-largest axis 3 < 4) becomes factored
    "becomes_factored": (GrowableVGG((2, "M", 8, "M"), 5), {"conv0": 6, "conv1": 8}, 4),
    # conv1 (3, 3, 2, 8) -> (3, 3, 6, 8): factored over (kh, out), then over (in, out)
    "moves": (GrowableVGG((2, "M", 8, "M"), 5), {"conv0": 6, "conv1": 8}, 3),
}


@pytest.mark.parametrize("case", sorted(ADAFACTOR_CASES))
def test_adafactor_statistics_against_numpy(case, images, g):
    """After one Adafactor step (decay 0 at step 0) its statistics are exact means of ``g ** 2``
    (``g ** 2`` a product over axes, so even a reconstruction from factors is exact); growth must
    give, for the grown shapes, the means over the axes Adafactor factors *at the new shape*, old
    entries in the leading corner, zeros elsewhere."""
    model, widths, min_dim = ADAFACTOR_CASES[case]
    tx = optax.adafactor(1e-2, min_dim_size_to_factor=min_dim)
    state = g.perturbed_state(model, images)
    rng = np.random.default_rng(0)

    def product(p):          # g ** 2 = f_0[a_0] * f_1[a_1] * ... (positive factors)
        out = np.ones((), np.float32)
        for n in np.shape(p):
            out = out[..., None] * rng.uniform(0.5, 2.0, n).astype(np.float32)
        return np.sqrt(out)
    grads = jax.tree.map(product, state.params)
    _, opt = tx.update(grads, tx.init(state.params), state.params)
    grown = growth.grow(state.replace(opt_state=opt), model, widths, jax.random.PRNGKey(0), tx=tx,
                        new_moments="zeros")
    fs = grown.opt_state[0]
    assert isinstance(fs, optax.FactoredState)
    flat = lambda t: traverse_util.flatten_dict(jax.tree.map(np.asarray, t))  # noqa: E731
    g2, new_p = flat(grads), flat(grown.params)
    row, col, v = flat(fs.v_row), flat(fs.v_col), flat(fs.v)
    for k, gk in g2.items():
        sq = gk.astype(np.float64) ** 2 + 1e-30
        shape = new_p[k].shape
        order = np.argsort(shape)
        if len(shape) >= 2 and shape[order[-2]] >= min_dim:      # factored at the new shape
            d1, d0 = order[-2], order[-1]
            np.testing.assert_allclose(row[k], _pad_np(sq.mean(d0), np.delete(shape, d0)), rtol=1e-5)
            np.testing.assert_allclose(col[k], _pad_np(sq.mean(d1), np.delete(shape, d1)), rtol=1e-5)
        else:
            np.testing.assert_allclose(v[k], _pad_np(sq, shape), rtol=1e-5)
    kernel = g2[("conv1", "kernel")].shape, new_p[("conv1", "kernel")].shape
    assert kernel[0] != kernel[1]
    updates, _ = tx.update(jax.tree.map(np.ones_like, grown.params), grown.opt_state, grown.params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def _pad_np(x, shape):
    out = np.zeros(tuple(shape))
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


def test_birth_state_inside_a_partition_grows(images, g):
    """LRA on one group of optax.multi_transform: its birth map holds MaskedNodes for the other
    group's leaves; it still grows (new kernel entries get stage 1) to what init gives."""
    kernels = lambda p: jax.tree.map(lambda x: "k" if np.ndim(x) > 1 else "o", p)  # noqa: E731
    tx = optax.multi_transform({"k": optax.chain(optax.sgd(0.1, 0.9), growth.scale_by_birth_stage()),
                                "o": optax.adam(1e-2)}, kernels)
    state = _steps(tx, g.perturbed_state(VGG, images), 1)
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx)
    want = tx.init(grown.params)
    assert jax.tree.structure(grown.opt_state) == jax.tree.structure(want)
    birth = grown.opt_state.inner_states["k"].inner_state[1]
    assert int(birth.stage) == 1 and bool(birth.stale)
    b = np.asarray(birth.birth["conv2"]["kernel"])
    assert b.shape == (3, 3, 6, 12) and (b[..., :8] == 0).all() and (b[..., 8:] == 1).all()
    updates, _ = tx.update(jax.tree.map(np.ones_like, grown.params), grown.opt_state, grown.params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_new_entries_start_as_a_fresh_state(images, g):
    """Adagrad's accumulator starts at initial_accumulator_value (0.1), not 0: the new entries get
    0.1 (a zero accumulator makes the first step sign(g) times the learning rate)."""
    tx = optax.adagrad(1.0, initial_accumulator_value=0.1)
    state = _steps(tx, g.perturbed_state(VGG, images), 2)
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx)
    for a, b in _pairs(state.opt_state[0].sum_of_squares, grown.opt_state[0].sum_of_squares):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(b[_old(a, b)], a.ravel())
        np.testing.assert_allclose(b[~_old(a, b)], 0.1)
    grads = jax.tree.map(lambda p: np.full(np.shape(p), 1e-2, np.float32), grown.params)
    updates, _ = tx.update(grads, grown.opt_state, grown.params)
    new = np.asarray(updates["fc"]["kernel"])[8:]       # fc: in 8 -> 12; a fresh entry's step
    np.testing.assert_allclose(-new, 1e-2 / np.sqrt(0.1 + 1e-4), rtol=1e-4)


def test_growing_past_the_tracked_stages_is_refused(images, g):
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), growth.scale_by_birth_stage(max_stages=2))
    state = _steps(tx, g.perturbed_state(VGG, images), 1)
    grown = growth.grow(state, VGG, VGG_TO, jax.random.PRNGKey(0), tx=tx)
    assert int(grown.opt_state[1].stage) == 1 and grown.opt_state[1].max_stages == 2
    with pytest.raises(ValueError, match="max_stages=2"):
        growth.grow(grown, VGG.at_widths(VGG_TO), VGG_TO2, jax.random.PRNGKey(1), tx=tx)
