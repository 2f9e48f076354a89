"""Phase 1 against NumPy: the noise is uniform with exactly the deployed step; evaluation; penalty
and budget forms; roles and optimizers; bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pae
from pae import quant as q
from pae.core import label_roles, select as S


def _params(key=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
    return {"Conv_0": {"kernel": jax.random.normal(k1, (3, 2, 5, 7)) * 0.3, "bias": jnp.zeros(7)},
            "Dense_0": {"kernel": jax.random.normal(k2, (37, 29)), "bias": jnp.zeros(29)},
            "Dense_1": {"kernel": jax.random.normal(k3, (29, 3)) * 2.0}}


def _random_widths(latent, seed=5):
    key = jax.random.PRNGKey(seed)

    def f(n):
        nonlocal key
        key, sub = jax.random.split(key)
        return n.replace(logits=jax.random.normal(sub, n.logits.shape) * 2.0)
    return pae.core.map_nodes(f, latent, q.NoisyWeight)


def _np_bits(n):
    return 1.0 + 7.0 / (1.0 + np.exp(-np.asarray(n.logits, np.float64)))


@pytest.mark.parametrize("granularity", ["input", "output"])
@pytest.mark.parametrize("learned_range", [False, True])
def test_noise_is_uniform_with_exactly_the_deployed_step(granularity, learned_range):
    t = q.noise_injection(granularity=granularity, learned_range=learned_range)
    latent = _random_widths(t.init(_params(), jax.random.PRNGKey(0)))
    if learned_range:   # a clip below the max-abs, so clipping matters
        latent = pae.core.map_nodes(lambda n: n.replace(log_range=n.log_range - 0.3), latent,
                                    q.NoisyWeight)
    ctx = pae.Context.make(key=7, train=True)
    out = jax.jit(t.apply)(latent, ctx)
    assert np.all(np.asarray(out["Conv_0"]["bias"]) == 0)
    pooled = []
    for name in ("Conv_0", "Dense_0", "Dense_1"):
        n = latent[name]["kernel"]
        w = np.asarray(n.weight, np.float64)
        b = _np_bits(n)
        b = b[:, None] if granularity == "input" else b
        assert n.logits.shape == (w.shape[-2] if granularity == "input" else w.shape[-1],)
        r = np.exp(np.asarray(n.log_range, np.float64)) if learned_range else np.abs(w).max(
            axis=tuple(range(w.ndim - 1)))
        step = 2 * r / (2 ** b - 1)
        u = (np.asarray(out[name]["kernel"], np.float64) - np.clip(w, -r, r)) / step
        assert np.all(np.abs(u) <= 0.5 + 1e-3), name
        pooled.append(u.ravel())
    u = np.concatenate(pooled)
    # Kolmogorov-Smirnov against U(-1/2, 1/2): D below the 0.1 % critical value 1.95 / sqrt(n)
    u_sorted = np.sort(u)
    ecdf = np.arange(1, u.size + 1) / u.size
    d = max(np.abs(ecdf - (u_sorted + 0.5)).max(), np.abs(ecdf - 1 / u.size - (u_sorted + 0.5)).max())
    assert d < 1.95 / np.sqrt(u.size)
    assert abs(u.mean()) < 0.02 and abs(u.var() - 1 / 12) < 0.01
    # another step (the engine folds the key with the step) draws other noise
    other = jax.jit(t.apply)(latent, ctx.replace(key=jax.random.fold_in(ctx.key, 1)))
    assert not np.allclose(other["Dense_0"]["kernel"], out["Dense_0"]["kernel"])


def test_evaluation_uses_the_deployed_quantizer_or_clean_weights():
    params = _params(1)
    for mode in ("quantize", "clean"):
        t = q.noise_injection(eval_mode=mode)
        latent = _random_widths(t.init(params, None), seed=2)
        out = jax.jit(t.apply)(latent, pae.Context.make(key=3, train=False))
        for name in ("Conv_0", "Dense_0"):
            n = latent[name]["kernel"]
            w = np.asarray(n.weight, np.float64)
            if mode == "clean":
                np.testing.assert_array_equal(out[name]["kernel"], n.weight)
                continue
            b = np.floor(_np_bits(n) + 0.5)[:, None]
            r = np.abs(w).max(axis=tuple(range(w.ndim - 1)))
            o = (2 ** b - 1) / 2
            x = w / (r / o) + o
            want = (np.clip(np.round(x), 0, 2 * o) - o) * (r / o)
            ok = np.abs(x - np.floor(x) - 0.5) > 1e-3
            np.testing.assert_allclose(np.asarray(out[name]["kernel"])[ok], want[ok], rtol=1e-5, atol=1e-6)
        if mode == "quantize":
            fin = t.finalize(latent, None)
            np.testing.assert_allclose(fin["Dense_0"]["kernel"], out["Dense_0"]["kernel"], rtol=1e-6)


def test_penalty_lambda_and_budget_forms_match_numpy():
    params = _params(2)
    base = q.noise_injection()
    latent = _random_widths(base.init(params, None), seed=9)
    total, count = 0.0, 0
    for name in ("Conv_0", "Dense_0", "Dense_1"):
        n = latent[name]["kernel"]
        per = np.size(n.weight) // n.logits.shape[0]
        total += per * _np_bits(n).sum()
        count += np.size(n.weight)
    avg = total / count
    np.testing.assert_allclose(float(q.average_bits(latent)), avg, rtol=1e-5)
    ctx = pae.Context.make()
    assert 2.0 < avg < 7.0
    for lmbda, target, mu in ((0.01, None, 1.0), (0.0, 2.0, 0.5), (0.003, 3.0, 2.0), (0.0, 8.0, 1.0),
                              (0.02, 7.0, 3.0)):
        for form in ("two_sided", "hinge"):
            t = q.noise_injection(lmbda=lmbda, target_bits=target, budget_weight=mu, budget_form=form)
            excess = 0.0 if target is None else avg - target
            want = lmbda * avg + mu * (abs(excess) if form == "two_sided" else max(0.0, excess))
            np.testing.assert_allclose(float(jax.jit(t.penalty)(latent, ctx)), want, rtol=1e-5,
                                       atol=1e-8)
    # below the budget the two-sided form pushes the widths up, the hinge leaves them alone
    for form, sign in (("two_sided", -1), ("hinge", 0)):
        t = q.noise_injection(target_bits=7.9, budget_form=form)
        g = np.asarray(jax.grad(lambda lat: t.penalty(lat, ctx))(latent)["Dense_0"]["kernel"].logits)
        assert np.all(np.sign(g) == sign)
    # the penalty pulls every width down (its gradient on the logits is positive) above the budget
    t = q.noise_injection(target_bits=1.5)
    g = jax.grad(lambda lat: t.penalty(lat, ctx))(latent)
    assert np.all(np.asarray(g["Dense_0"]["kernel"].logits) > 0)
    assert np.all(np.asarray(g["Dense_0"]["kernel"].weight) == 0)


def test_bits_have_their_own_role_optimizer_and_no_weight_decay():
    t = q.noise_injection(learned_range=True)
    latent = t.init(_params(3), None)
    roles = label_roles(latent)
    assert roles["Dense_0"]["kernel"].logits == "bits" and roles["Dense_0"]["kernel"].weight == "weights"
    assert roles["Dense_0"]["kernel"].log_range == "range" and roles["Dense_0"]["bias"] == "weights"
    with pytest.raises(ValueError, match="range"):
        pae.core.role_optimizer({"weights": optax.sgd(0.1), "bits": optax.adam(1e-3)}).init(latent)
    tx = q.quant_optimizer(q.QuantConfig(lr=0.1, weight_decay=0.5, bits_lr=1e-3))
    zeros = jax.tree.map(jnp.zeros_like, latent)
    updates, _ = tx.update(zeros, tx.init(latent), latent)
    assert np.all(np.asarray(updates["Dense_0"]["kernel"].logits) == 0)        # no decay on bits
    assert np.all(np.asarray(updates["Dense_0"]["kernel"].log_range) == 0)
    assert np.abs(np.asarray(updates["Dense_0"]["kernel"].weight)).max() > 0     # decay on weights
    # gradients reach the widths through the noise
    ctx = pae.Context.make(key=1)
    g = jax.grad(lambda lat: jnp.sum(t.apply(lat, ctx)["Dense_0"]["kernel"] ** 2))(latent)
    assert np.abs(np.asarray(g["Dense_0"]["kernel"].logits)).max() > 0


def test_bad_input_raises_clear_errors():
    params = _params()
    with pytest.raises(ValueError, match="select=.*matches no leaf"):
        q.noise_injection(S.path("nothing_here")).init(params, None)
    with pytest.raises(ValueError, match="Dense_0/bias"):
        q.noise_injection(S.path("Dense_0")).init(params, None)
    nan = jax.tree.map(lambda a: a, params)
    nan["Dense_1"]["kernel"] = nan["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="'Dense_1/kernel' has NaN or Inf"):
        q.noise_injection().init(nan, None)
    for kwargs, match in (({"b_min": 0}, "b_min"), ({"b_max": 9}, "b_max"),
                          ({"b_min": 4, "b_max": 3}, "b_min must be < b_max"),
                          ({"b_init": 8.0}, "b_init"), ({"granularity": "row"}, "granularity"),
                          ({"eval_mode": "noisy"}, "eval_mode"), ({"budget_form": "soft"}, "budget_form"), ({"lmbda": -1}, "lmbda"),
                          ({"target_bits": 0.5}, "target_bits"), ({"budget_weight": np.nan}, "budget_weight")):
        with pytest.raises(ValueError, match=match):
            q.noise_injection(**kwargs)
    with pytest.raises(TypeError, match="ctx"):
        q.noise_injection().apply(q.noise_injection().init(params, None), None)
    # two noise injections on disjoint selectors: each would act on both's nodes; refused
    two = pae.chain(q.noise_injection(S.path("Dense_0/kernel")), q.noise_injection(S.path("Dense_1/kernel")))
    with pytest.raises(ValueError, match="one noise_injection per model"):
        two.init(params, jax.random.PRNGKey(0))
    acts = pae.chain(q.act_noise_injection(S.path("Dense_0/kernel")), q.act_noise_injection(S.path("Dense_1/kernel")))
    with pytest.raises(ValueError, match="one act_noise_injection per model"):
        acts.init(params, jax.random.PRNGKey(0))
    # weights then activations of the same layers is the supported chain
    both = pae.chain(q.noise_injection(), q.act_noise_injection())
    assert len(pae.core.nodes(both.init(params, jax.random.PRNGKey(0)))) == 3 + 3
