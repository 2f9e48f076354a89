"""pae.optim against independent NumPy transliterations of the official PyTorch optimizers.

The references below are written from the official ``step()`` methods (lolemacs/avagrad
``optimizers.py``, Luolc/AdaBound ``adabound/adabound.py``, lolemacs/adabound-and-csgd
``csgd.py``): one loop over a "param group" (a list of float64 arrays), in-place style, with
Python-level ``if step > 1`` branches. They share no code with the implementation.

Every comparison runs >= 20 steps on a pytree whose leaves have distinct shapes and very different
gradient scales, with some coordinates whose gradient is always zero, and gradients that depend on
the parameters. Deliberately wrong variants of the references (per-leaf normalization, no gamma lag,
eps inside the debias, lr-scaled AdaBoundW decay, ...) are checked to be far from the
implementation, so the comparisons can tell those mistakes apart.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pae.optim as po

STEPS = 24

# ----------------------------------------------------------------------------------------------
# Problem: a multi-leaf pytree with distinct shapes; grads g = c * p + noise_t, noise scaled per leaf.
# ----------------------------------------------------------------------------------------------
SHAPES = {"bias": (5,), "conv": (3, 3, 2, 4), "dense": {"kernel": (7, 3)}, "scale": ()}
LEAF_ORDER = ["bias", "conv", "kernel", "scale"]  # sorted-key flattening order
CURVATURE = [0.5, 2.0, 1.0, 0.1]
NOISE_SCALE = [1e-3, 1.0, 10.0, 0.3]


def _flat_shapes():
    return [SHAPES["bias"], SHAPES["conv"], SHAPES["dense"]["kernel"], SHAPES["scale"]]


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    shapes = _flat_shapes()
    params0 = [rng.normal(size=s) for s in shapes]
    noise = [[NOISE_SCALE[i] * rng.normal(size=s) for i, s in enumerate(shapes)] for _ in range(STEPS)]
    # some coordinates of the conv leaf never receive gradient: their v stays 0, denom = eps
    dead = np.zeros(shapes[1], dtype=bool)
    dead[0, 0] = True
    return params0, noise, dead


def grads_np(params, noise_t, dead):
    out = [CURVATURE[i] * p + n for i, (p, n) in enumerate(zip(params, noise_t))]
    out[1] = np.where(dead, 0.0, out[1])
    return out


def to_tree(leaves, dtype):
    b, c, k, s = (np.asarray(x, dtype=dtype) for x in leaves)
    return {"bias": jnp.asarray(b), "conv": jnp.asarray(c), "dense": {"kernel": jnp.asarray(k)},
            "scale": jnp.asarray(s)}


def from_tree(tree):
    return [np.asarray(x, dtype=np.float64) for x in jax.tree.leaves(tree)]


def run_jax(tx, dtype, seed=0, steps=STEPS):
    """Trajectory of params (list of leaf lists, float64) under tx with jitted updates."""
    params0, noise, dead = make_problem(seed)
    params = to_tree(params0, dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    traj = []
    for t in range(steps):
        g = grads_np(from_tree(params), noise[t], dead)
        updates, state = update(to_tree(g, dtype), state, params)
        params = optax.apply_updates(params, updates)
        traj.append(from_tree(params))
    return traj, state


# ----------------------------------------------------------------------------------------------
# NumPy references (PyTorch step() transliterations)
# ----------------------------------------------------------------------------------------------
def _lr(lr, t0):
    return lr(t0) if callable(lr) else lr


def ref_avagrad(lr, b1, b2, eps, wd, decoupled=False, form="official", scope="global", seed=0):
    """AvaGrad / AvaGradW as in lolemacs/avagrad; ``scope``/``form`` allow wrong variants."""
    params, noise, dead = make_problem(seed)
    params = [p.copy() for p in params]
    exp_avg = [np.zeros_like(p) for p in params]
    exp_avg_sq = [np.zeros_like(p) for p in params]
    group_gamma = None
    leaf_gamma = [None] * len(params)
    traj = []
    for step in range(1, STEPS + 1):
        lr_t = _lr(lr, step - 1)
        grads = grads_np(params, noise[step - 1], dead)
        bias_correction1 = 1 - b1**step
        bias_correction2 = 1 - b2**step
        prev_bias_correction2 = 1 - b2 ** (step - 1)
        if form == "paper" and step > 1:
            etas = [1.0 / (np.sqrt(v) / math.sqrt(prev_bias_correction2) + eps) for v in exp_avg_sq]
            group_gamma = math.sqrt(sum(e.size for e in etas) / sum(np.sum(e**2) for e in etas))
            leaf_gamma = [math.sqrt(e.size / np.sum(e**2)) for e in etas]
        squared_norm, num_params = 0.0, 0
        for i, p in enumerate(params):
            grad = grads[i]
            if wd != 0 and not decoupled:
                grad = grad + wd * p
            exp_avg[i] = exp_avg[i] * b1 + (1 - b1) * grad
            sqrt_exp_avg_sq = np.sqrt(exp_avg_sq[i])
            if step > 1:
                denom = sqrt_exp_avg_sq / math.sqrt(prev_bias_correction2) + eps
                gamma = group_gamma if scope == "global" else leaf_gamma[i]
                step_size = gamma * lr_t / bias_correction1
                if wd != 0 and decoupled:
                    p = p * (1 - lr_t * wd)
                p = p - step_size * exp_avg[i] / denom
            params[i] = p
            exp_avg_sq[i] = exp_avg_sq[i] * b2 + (1 - b2) * grad * grad
            param_wise_lr = sqrt_exp_avg_sq / math.sqrt(bias_correction2) + eps
            squared_norm += np.sum(param_wise_lr ** (-2.0))
            num_params += param_wise_lr.size
            if form == "official":
                leaf_gamma[i] = 1.0 / math.sqrt(np.sum(param_wise_lr ** (-2.0)) / param_wise_lr.size)
        if form == "official":
            group_gamma = 1.0 / math.sqrt(squared_norm / num_params)
        traj.append([p.copy() for p in params])
    return traj


def ref_adabound(lr, final_lr, b1, b2, gamma, eps, wd, amsbound=False, decoupled=False,
                 base_lr=None, eps_mode="official", decay_times_lr=False, seed=0):
    """AdaBound / AMSBound / AdaBoundW as in Luolc/AdaBound; extra flags build wrong variants."""
    params, noise, dead = make_problem(seed)
    params = [p.copy() for p in params]
    if base_lr is None:
        base_lr = lr
    exp_avg = [np.zeros_like(p) for p in params]
    exp_avg_sq = [np.zeros_like(p) for p in params]
    max_exp_avg_sq = [np.zeros_like(p) for p in params]
    traj = []
    for step in range(1, STEPS + 1):
        lr_t = _lr(lr, step - 1)
        grads = grads_np(params, noise[step - 1], dead)
        for i, p in enumerate(params):
            grad = grads[i]
            if wd != 0 and not decoupled:
                grad = grad + wd * p
            exp_avg[i] = exp_avg[i] * b1 + (1 - b1) * grad
            exp_avg_sq[i] = exp_avg_sq[i] * b2 + (1 - b2) * grad * grad
            bias_correction1 = 1 - b1**step
            bias_correction2 = 1 - b2**step
            if amsbound:
                max_exp_avg_sq[i] = np.maximum(max_exp_avg_sq[i], exp_avg_sq[i])
                second = max_exp_avg_sq[i]
            else:
                second = exp_avg_sq[i]
            if eps_mode == "official":
                denom = np.sqrt(second) + eps
                step_size = lr_t * math.sqrt(bias_correction2) / bias_correction1
            else:  # wrong on purpose: eps added after debiasing v (modern Adam placement)
                denom = np.sqrt(second / bias_correction2) + eps
                step_size = lr_t / bias_correction1
            fl = final_lr * lr_t / base_lr
            lower = fl * (1 - 1 / (gamma * step + 1))
            upper = fl * (1 + 1 / (gamma * step))
            rate = np.clip(np.full_like(denom, step_size) / denom, lower, upper)
            new_p = p - rate * exp_avg[i]
            if wd != 0 and decoupled:
                new_p = new_p - (lr_t * wd if decay_times_lr else wd) * p
            params[i] = new_p
        traj.append([p.copy() for p in params])
    return traj


def ref_csgd(lr, momentum, wd, seed=0):
    """CSGD as in lolemacs/adabound-and-csgd."""
    params, noise, dead = make_problem(seed)
    params = [p.copy() for p in params]
    buf = [np.zeros_like(p) for p in params]
    traj = []
    for step in range(1, STEPS + 1):
        lr_t = _lr(lr, step - 1)
        grads = grads_np(params, noise[step - 1], dead)
        for i, p in enumerate(params):
            d_p = grads[i]
            if wd != 0:
                d_p = d_p + wd * p
            step_size = lr_t
            if momentum != 0:
                buf[i] = buf[i] * momentum + (1 - momentum) * d_p
                d_p = buf[i]
                step_size = step_size / (1 - momentum**step)
            params[i] = p - step_size * d_p
        traj.append([p.copy() for p in params])
    return traj


# ----------------------------------------------------------------------------------------------
# Comparison helpers
# ----------------------------------------------------------------------------------------------
def max_rel_err(traj_a, traj_b, floor=1e-3):
    """Largest |a - b| / (|b| + floor) over all steps, leaves and elements."""
    worst = 0.0
    for step_a, step_b in zip(traj_a, traj_b, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            worst = max(worst, float(np.max(np.abs(a - b) / (np.abs(b) + floor))))
    return worst


# float64 runs match to ~1e-12 relative; float32 runs accumulate rounding over 24 steps, so they
# are compared with an error floor at the parameters' scale (they are O(1)).
TOL = {np.float64: (1e-9, 1e-3), np.float32: (3e-5, 1.0)}


def assert_matches(traj, ref, dtype):
    tol, floor = TOL[dtype]
    err = max_rel_err(traj, ref, floor)
    assert err < tol, f"max relative error {err:.3g} >= {tol:.3g}"


def _run(tx, dtype):
    if dtype == np.float64:
        with jax.enable_x64(True):
            return run_jax(tx(), dtype)
    return run_jax(tx(), dtype)


def _moved(traj):
    params0, _, _ = make_problem()
    return max(float(np.max(np.abs(a - b))) for a, b in zip(traj[-1], params0))


# ----------------------------------------------------------------------------------------------
# AvaGrad
# ----------------------------------------------------------------------------------------------
AVAGRAD_CASES = {
    "avagrad-defaults": (dict(lr=0.1, b1=0.9, b2=0.999, eps=0.1, wd=0.0), False),
    "avagrad-small-eps-l2": (dict(lr=0.03, b1=0.8, b2=0.99, eps=1e-3, wd=5e-2), False),
    "avagradw": (dict(lr=0.05, b1=0.9, b2=0.99, eps=1e-2, wd=1e-1), True),
}


def _avagrad_tx(kw, decoupled, form="official"):
    factory = po.avagradw if decoupled else po.avagrad
    return lambda: factory(kw["lr"], kw["b1"], kw["b2"], kw["eps"], kw["wd"], form=form)


def _with_float32(cases, first_only_f32):
    """All cases in float64 (tight tolerance); float32 for the selected ones (compiles cost ~1 s)."""
    out = [(*c, np.float64) for c in cases]
    out += [(*c, np.float32) for c in cases if c in first_only_f32]
    return out


@pytest.mark.parametrize(
    "case,form,dtype",
    _with_float32(
        [(c, f) for c in AVAGRAD_CASES for f in ("official", "paper")],
        [("avagrad-defaults", "official"), ("avagradw", "paper")],
    ),
)
def test_avagrad_matches_reference(case, form, dtype):
    kw, decoupled = AVAGRAD_CASES[case]
    traj, _ = _run(_avagrad_tx(kw, decoupled, form), dtype)
    ref = ref_avagrad(kw["lr"], kw["b1"], kw["b2"], kw["eps"], kw["wd"], decoupled, form=form)
    assert _moved(ref) > 1e-2  # the problem is not trivial
    assert_matches(traj, ref, dtype)


def test_avagrad_reference_comparison_is_discriminative():
    """Per-leaf normalization, a missing gamma lag and AvaGradW-style decay all change the path."""
    kw, _ = AVAGRAD_CASES["avagrad-small-eps-l2"]
    args = (kw["lr"], kw["b1"], kw["b2"], kw["eps"], kw["wd"])
    with jax.enable_x64(True):
        traj, _ = run_jax(po.avagrad(*args), np.float64)
    assert max_rel_err(traj, ref_avagrad(*args)) < 1e-9
    assert max_rel_err(traj, ref_avagrad(*args, scope="per_leaf")) > 1e-3
    assert max_rel_err(traj, ref_avagrad(*args, form="paper")) > 1e-3
    assert max_rel_err(traj, ref_avagrad(*args, decoupled=True)) > 1e-3


def _step_schedule(init, boundaries, factor):
    """lr = init * factor ** (number of boundaries passed); works on ints and traced arrays."""
    return lambda t: init * factor ** sum((t >= b) * 1 for b in boundaries)


def test_avagrad_schedule_matches_reference():
    sched = _step_schedule(0.1, (8, 16), 0.2)
    with jax.enable_x64(True):
        traj, _ = run_jax(po.avagradw(sched, 0.9, 0.999, 0.05, 1e-2), np.float64)
    ref = ref_avagrad(sched, 0.9, 0.999, 0.05, 1e-2, decoupled=True)
    assert max_rel_err(traj, ref) < 1e-9


@pytest.mark.parametrize("factory", [po.avagrad, po.avagradw])
@pytest.mark.parametrize("form", ["official", "paper"])
def test_avagrad_first_update_is_exactly_zero_and_state_moves(factory, form):
    params0, noise, dead = make_problem()
    params = to_tree(params0, np.float32)
    tx = factory(0.1, eps=1e-2, weight_decay=0.1, form=form)
    state = tx.init(params)
    g = to_tree(grads_np(params0, noise[0], dead), np.float32)
    updates, state = jax.jit(tx.update)(g, state, params)
    for u in jax.tree.leaves(updates):
        assert np.all(np.asarray(u) == 0.0)
    inner = state[0] if factory is po.avagradw else state[1]
    assert int(inner.count) == 1
    assert all(np.any(np.asarray(m) != 0) for m in jax.tree.leaves(inner.mu))
    assert all(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(inner.sqrt_nu))
    # second update moves
    updates2, _ = jax.jit(tx.update)(g, state, params)
    assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates2))


def test_avagrad_official_gamma_lag_values():
    """Official: gamma after step 1 is eps; after step 2 it is built from v_1 debiased by 1-b2^2."""
    b1, b2, eps = 0.9, 0.99, 0.05
    tx = po.scale_by_avagrad(b1, b2, eps)
    params0, noise, dead = make_problem()
    params = to_tree(params0, np.float32)
    state = tx.init(params)
    g1 = grads_np(params0, noise[0], dead)
    update = jax.jit(tx.update)
    _, state = update(to_tree(g1, np.float32), state)
    np.testing.assert_allclose(float(state.gamma), eps, rtol=1e-6)
    _, state = update(to_tree(g1, np.float32), state)
    v1 = [(1 - b2) * g * g for g in g1]
    rho = np.concatenate([(np.sqrt(v) / math.sqrt(1 - b2**2) + eps).ravel() for v in v1])
    np.testing.assert_allclose(float(state.gamma), 1 / np.sqrt(np.mean(rho**-2.0)), rtol=1e-5)


def test_avagrad_paper_gamma_is_inverse_rms_of_step_rates():
    """Paper form at step 2: update = gamma * eta * m / (1 - b1^2) with gamma = 1/RMS(eta)."""
    b1, b2, eps = 0.9, 0.99, 0.05
    tx = po.scale_by_avagrad(b1, b2, eps, form="paper")
    params0, noise, dead = make_problem()
    state = tx.init(to_tree(params0, np.float32))
    g1 = grads_np(params0, noise[0], dead)
    g2 = grads_np(params0, noise[1], dead)
    update = jax.jit(tx.update)
    _, state = update(to_tree(g1, np.float32), state)
    updates, state = update(to_tree(g2, np.float32), state)
    eta = [1.0 / (np.sqrt((1 - b2) * g * g / (1 - b2)) + eps) for g in g1]
    flat = np.concatenate([e.ravel() for e in eta])
    gamma = 1.0 / np.sqrt(np.mean(flat**2))
    np.testing.assert_allclose(float(state.gamma), gamma, rtol=1e-5)
    m2 = [b1 * (1 - b1) * a + (1 - b1) * b for a, b in zip(g1, g2)]
    expected = [gamma * e * m / (1 - b1**2) for e, m in zip(eta, m2)]
    for u, e in zip(from_tree(updates), expected):
        np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# AdaBound / AMSBound / AdaBoundW
# ----------------------------------------------------------------------------------------------
ADABOUND_CASES = {
    "adabound-defaults": dict(lr=1e-3, final_lr=0.1, b1=0.9, b2=0.999, gamma=1e-3, eps=1e-8, wd=0.0),
    # a fast bound schedule so that the clip is active on both sides within 24 steps
    # b2 = 0.6 lets the raw v go down within 24 steps, so AMSBound's max matters
    "adabound-tight-l2": dict(lr=0.02, final_lr=0.05, b1=0.8, b2=0.6, gamma=0.2, eps=1e-3, wd=5e-2),
    "adabound-large-eps": dict(lr=0.01, final_lr=0.5, b1=0.9, b2=0.999, gamma=0.05, eps=0.1, wd=1e-2),
}


def _adabound_tx(kw, amsbound, decoupled):
    args = (kw["lr"], kw["final_lr"], kw["b1"], kw["b2"], kw["gamma"], kw["eps"], kw["wd"], amsbound)
    return lambda: (po.adaboundw if decoupled else po.adabound)(*args)


@pytest.mark.parametrize(
    "case,variant,dtype",
    _with_float32(
        [(c, v) for c in ADABOUND_CASES for v in ("adabound", "amsbound", "adaboundw", "amsboundw")],
        [("adabound-defaults", "adabound"), ("adabound-tight-l2", "amsboundw")],
    ),
)
def test_adabound_matches_reference(case, variant, dtype):
    kw = ADABOUND_CASES[case]
    ams, dec = "ams" in variant, variant.endswith("w")
    traj, _ = _run(_adabound_tx(kw, ams, dec), dtype)
    ref = ref_adabound(kw["lr"], kw["final_lr"], kw["b1"], kw["b2"], kw["gamma"], kw["eps"], kw["wd"],
                       amsbound=ams, decoupled=dec)
    assert _moved(ref) > 1e-2
    assert_matches(traj, ref, dtype)


def test_amsbound_alias_equals_adabound_flag():
    kw = ADABOUND_CASES["adabound-tight-l2"]
    args = (kw["lr"], kw["final_lr"], kw["b1"], kw["b2"], kw["gamma"], kw["eps"], kw["wd"])
    a, _ = run_jax(po.amsbound(*args), np.float32)
    b, _ = run_jax(po.adabound(*args, True), np.float32)
    assert max_rel_err(a, b) == 0.0


def test_adabound_clip_is_active_in_tight_case():
    """The tight case really exercises the clip (otherwise it would not test it)."""
    kw = ADABOUND_CASES["adabound-tight-l2"]
    args = [kw[k] for k in ("lr", "final_lr", "b1", "b2")]
    clipped = ref_adabound(*args, kw["gamma"], kw["eps"], kw["wd"])
    unclipped = ref_adabound(*args, 1e-12, kw["eps"], kw["wd"])
    assert max_rel_err(clipped, unclipped) > 1e-2


def test_adabound_reference_comparison_is_discriminative():
    kw = ADABOUND_CASES["adabound-large-eps"]
    args = [kw[k] for k in ("lr", "final_lr", "b1", "b2", "gamma", "eps", "wd")]
    with jax.enable_x64(True):
        traj, _ = run_jax(po.adaboundw(*args), np.float64)
        traj_ams, _ = run_jax(po.adabound(*args, True), np.float64)
    assert max_rel_err(traj, ref_adabound(*args, decoupled=True)) < 1e-9
    assert max_rel_err(traj, ref_adabound(*args, decoupled=True, eps_mode="modern")) > 1e-3
    assert max_rel_err(traj, ref_adabound(*args, decoupled=True, decay_times_lr=True)) > 1e-3
    assert max_rel_err(traj, ref_adabound(*args, decoupled=False)) > 1e-3
    assert max_rel_err(traj_ams, ref_adabound(*args, amsbound=True)) < 1e-9
    tight = [ADABOUND_CASES["adabound-tight-l2"][k]
             for k in ("lr", "final_lr", "b1", "b2", "gamma", "eps", "wd")]
    with jax.enable_x64(True):
        traj_ams, _ = run_jax(po.amsbound(*tight), np.float64)
    assert max_rel_err(traj_ams, ref_adabound(*tight, amsbound=True)) < 1e-9
    assert max_rel_err(traj_ams, ref_adabound(*tight, amsbound=False)) > 1e-3


def test_adabound_bounds_follow_schedule_relative_to_reference_lr():
    """lr x0.1 at step 8 also scales final_lr x0.1 (PyTorch: final_lr * lr / base_lr)."""
    sched = _step_schedule(0.02, (8,), 0.1)
    kw = ADABOUND_CASES["adabound-tight-l2"]
    rest = [kw[k] for k in ("final_lr", "b1", "b2", "gamma", "eps", "wd")]
    with jax.enable_x64(True):
        traj, _ = run_jax(po.adabound(sched, *rest, reference_lr=0.02), np.float64)
        traj_ref5, _ = run_jax(po.adabound(sched, *rest, reference_lr=0.005), np.float64)
    assert max_rel_err(traj, ref_adabound(sched, *rest, base_lr=0.02)) < 1e-9
    ref5 = ref_adabound(sched, *rest, base_lr=0.005)
    assert max_rel_err(traj_ref5, ref5) < 1e-9
    assert max_rel_err(traj_ref5, traj) > 1e-3
    with pytest.raises(ValueError, match="learning_rate is a schedule; pass reference_lr"):
        po.adabound(sched, *rest)      # a schedule does not tell its nominal lr (it may warm up)


def test_adabound_bounds_function():
    lower, upper = po.adabound_bounds(0.1, 1e-3, 1)
    np.testing.assert_allclose(float(lower), 0.1 * (1 - 1 / 1.001), rtol=1e-6)
    np.testing.assert_allclose(float(upper), 0.1 * 1001, rtol=1e-6)
    lower, upper = po.adabound_bounds(0.0, 0.0, 5)  # gamma = 0: no clipping, never inf or NaN
    assert float(lower) == 0.0 and float(upper) == float(np.finfo(np.float32).max)
    ts = np.arange(1, 5000)
    lo, hi = jax.vmap(lambda t: po.adabound_bounds(0.1, 1e-3, t))(ts)
    assert np.all(np.diff(np.asarray(lo)) >= 0) and np.all(np.diff(np.asarray(hi)) <= 0)
    assert np.all(np.asarray(lo) <= 0.1) and np.all(np.asarray(hi) >= 0.1)


# ----------------------------------------------------------------------------------------------
# CSGD
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "lr,momentum,wd,dtype",
    _with_float32([(0.1, 0.0, 0.0), (0.05, 0.9, 5e-2), (0.1, 0.5, 0.0)], [(0.05, 0.9, 5e-2)]),
)
def test_csgd_matches_reference(lr, momentum, wd, dtype):
    traj, _ = _run(lambda: po.csgd(lr, momentum, wd), dtype)
    ref = ref_csgd(lr, momentum, wd)
    assert _moved(ref) > 1e-2
    assert_matches(traj, ref, dtype)


def test_csgd_differs_from_undampened_sgd():
    a, _ = run_jax(po.csgd(0.01, 0.9), np.float32)
    b, _ = run_jax(optax.sgd(0.01, momentum=0.9), np.float32)
    assert max_rel_err(a, b) > 1e-2
