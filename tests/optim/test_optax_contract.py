"""The optax common-test battery for pae.optim: convergence, jit, dtypes, wrappers, sharding.

Modeled on what optax checks for its own optimizers (alias_test / contrib common tests): every
optimizer converges on a parabola and on Rosenbrock, does not recompile on its second jitted
update, accepts unknown keyword arguments, gives the same updates under
``optax.inject_hyperparams``, keeps the gradients' dtype, keeps state dtypes/shapes fixed, works
inside ``optax.MultiSteps`` and ``optax.multi_transform``, and keeps the sharding of sharded
parameters on 8 (forced CPU) devices.
"""
from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pae.optim as po
from pae.optim import _adabound, _avagrad, _csgd

# (factory, kwargs) tuned once so that 10,000 steps solve both test problems to 3e-2.
OPTIMIZERS = {
    "avagrad": (po.avagrad, dict(learning_rate=0.03, eps=0.1)),
    "avagrad_paper": (po.avagrad, dict(learning_rate=0.03, eps=0.1, form="paper")),
    "avagradw": (po.avagradw, dict(learning_rate=0.03, eps=0.1, weight_decay=1e-4)),
    "adabound": (po.adabound, dict(learning_rate=1e-2, final_lr=3e-3)),
    "amsbound": (po.amsbound, dict(learning_rate=1e-2, final_lr=3e-3, weight_decay=1e-5)),
    "adaboundw": (po.adaboundw, dict(learning_rate=1e-2, final_lr=3e-3, weight_decay=1e-6)),
    "csgd": (po.csgd, dict(learning_rate=2e-3, momentum=0.9, weight_decay=1e-5)),
}
NAMES = list(OPTIMIZERS)


def make(name, **overrides):
    factory, kwargs = OPTIMIZERS[name]
    return factory(**{**kwargs, **overrides})


def parabola(dtype=jnp.float32):
    x0 = jnp.array([-1.0, 10.0, 1.0], dtype)
    target = jnp.array([1.0, -1.0, 1.0], dtype)
    return x0, target, lambda p: jnp.sum((p - target) ** 2)


def rosenbrock(dtype=jnp.float32):
    x0 = jnp.array([0.0, 0.0], dtype)
    target = jnp.array([1.0, 1.0], dtype)
    return x0, target, lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


def tree_params(dtype=jnp.float32, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "w": jax.random.normal(k1, (4, 3), dtype),
        "b": jax.random.normal(k2, (3,), dtype),
        "s": jax.random.normal(k3, (), dtype),
    }


def tree_grads(params, t):
    """Deterministic, parameter-dependent gradients for step t."""
    return jax.tree.map(lambda p: (p * 0.5 + jnp.sin(p * (t + 1.0)) * 0.3).astype(p.dtype), params)


def avals(tree):
    return jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype), jax.typeof(x).weak_type), tree)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("problem", [parabola, rosenbrock], ids=["parabola", "rosenbrock"])
@pytest.mark.parametrize("name", NAMES)
def test_converges(name, problem):
    tx = make(name)
    x0, target, objective = problem()

    @jax.jit
    def solve(x0):
        def body(carry, _):
            params, state = carry
            grads = jax.grad(objective)(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), None, length=10_000)
        return params

    params = solve(x0)
    np.testing.assert_allclose(np.asarray(params), np.asarray(target), rtol=3e-2, atol=3e-2)


# ----------------------------------------------------------------------------------------------
# bf16 and f32 for every optimizer; f16 and f64 (under x64, where Python-float hyperparameters
# become float64) for one member of each code path, to keep the suite fast on 2 CPU cores.
JIT_CASES = [(n, d) for n in NAMES for d in (jnp.bfloat16, jnp.float32)] + [
    ("avagrad", jnp.float64), ("avagrad_paper", jnp.float16), ("avagradw", jnp.float64),
    ("amsbound", jnp.float64), ("adaboundw", jnp.float16), ("csgd", jnp.float64),
]


@pytest.mark.parametrize("name,dtype", JIT_CASES, ids=lambda x: x if isinstance(x, str) else jnp.dtype(x).name)
def test_jit_contract(name, dtype):
    """One trace for three jitted updates (no recompilation), gradient dtype kept, state avals
    fixed, unknown keyword arguments accepted, all values finite; also under lax.cond."""
    with jax.enable_x64(dtype == jnp.float64):
        tx = make(name)
        params = tree_params(dtype)
        state = tx.init(params)
        traces = []

        @jax.jit
        def step(params, state, t):
            traces.append(None)
            grads = tree_grads(params, t)
            updates, new_state = tx.update(grads, state, params, unexpected_kwarg=t)
            # both branches of a cond must have identical types: the optax state-stability test
            keep = jax.random.bernoulli(jax.random.fold_in(jax.random.key(0), t))
            new_state = jax.lax.cond(keep, lambda: state, lambda: new_state)
            return updates, new_state

        state0_avals = avals(state)
        for t in range(3):
            updates, state = step(params, state, t)
            assert avals(updates) == avals(params)
            assert avals(state) == state0_avals
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(updates))
        assert len(traces) == 1, "the update was retraced (state types changed)"


def test_scale_by_transforms_accept_extra_args():
    params = tree_params()
    for tx in (po.scale_by_avagrad(), po.scale_by_adabound(amsbound=True)):
        state = tx.init(params)
        a, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, some_extra=1))(params, state, params)
        b, _ = jax.jit(tx.update)(params, state, params)
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_init_with_abstract_input():
    spec = jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)
    for name in NAMES:
        state = jax.eval_shape(make(name).init, spec)
        assert all(x.shape in ((), (2, 4, 8)) for x in jax.tree.leaves(state))


# ----------------------------------------------------------------------------------------------
def _run_steps(tx, params, steps=6, apply=True):
    """Updates of ``steps`` jitted steps; with apply=False the params stay fixed, so that two
    optimizers that differ by float rounding are compared without the trajectory amplifying it."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for t in range(steps):
        updates, state = update(tree_grads(params, t), state, params)
        if apply:
            params = optax.apply_updates(params, updates)
        out.append(updates)
    return out, state


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_and_constant_schedule_give_same_updates(name):
    factory, kwargs = OPTIMIZERS[name]
    params = tree_params()
    plain, plain_state = _run_steps(factory(**kwargs), params, apply=False)
    injected, inj_state = _run_steps(optax.inject_hyperparams(factory)(**kwargs), params, apply=False)
    constant = optax.constant_schedule(kwargs["learning_rate"])
    reference = {"reference_lr": kwargs["learning_rate"]} if "bound" in name else {}   # AdaBound's
    scheduled, _ = _run_steps(factory(**{**kwargs, "learning_rate": constant, **reference}), params,
                              apply=False)
    assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(plain))
    for a, b, c in zip(plain, injected, scheduled):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-9), a, b)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), a, c)
    # Injected hyperparameters are float32 arrays, so 1 - b2 is evaluated in float32
    # (1 - f32(0.999) = 0.00099998713): the raw second moment differs by 1.3e-5 relative. The bias
    # correction uses the same rounded b2, which is why the updates above still agree to ~1e-6.
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=3e-5, atol=1e-9),
        plain_state, inj_state.inner_state,
    )


def test_inject_hyperparams_adabound_schedule_with_reference_lr():
    """With inject_hyperparams the factory sees lr_t; reference_lr keeps the bounds following it."""
    sched = optax.piecewise_constant_schedule(0.05, {2: 0.1})
    kw = dict(final_lr=0.02, gamma=0.5, reference_lr=0.05)
    params = tree_params()
    plain, _ = _run_steps(po.adabound(sched, **kw), params, apply=False)
    injected, _ = _run_steps(optax.inject_hyperparams(po.adabound)(sched, **kw), params, apply=False)
    no_ref, _ = _run_steps(
        optax.inject_hyperparams(po.adabound)(sched, 0.02, gamma=0.5), params, apply=False)
    for a, b in zip(plain, injected):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9), a, b)
    diff = max(float(jnp.max(jnp.abs(x - y)))
               for a, b in zip(plain[3:], no_ref[3:]) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert diff > 1e-5  # without reference_lr the bounds do not follow the schedule


def test_inject_hyperparams_can_change_eps_without_recompiling():
    tx = optax.inject_hyperparams(po.avagrad)(learning_rate=0.1, eps=0.1)
    params = tree_params()
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(state):
        traces.append(None)
        return tx.update(tree_grads(params, 0), state, params)

    _, state = step(state)
    u1, _ = step(state)
    state.hyperparams["eps"] = jnp.asarray(1e-3, state.hyperparams["eps"].dtype)
    u2, _ = step(state)
    assert len(traces) == 1
    assert not np.allclose(u1["w"], u2["w"])


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_multisteps(name):
    """MultiSteps(k=3): zeros on the first two calls; the third applies the mean gradient once."""
    tx = make(name)
    params = tree_params()
    multi = optax.MultiSteps(tx, every_k_schedule=3)
    state = multi.init(params)
    update = jax.jit(multi.update)
    grads = [tree_grads(params, t) for t in range(3)]
    for g in grads[:2]:
        updates, state = update(g, state, params)
        assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(updates))
    updates, state = update(grads[2], state, params)
    mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
    expected, _ = jax.jit(tx.update)(mean, tx.init(params), params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), updates, expected)


def test_multi_transform_gives_each_partition_its_own_optimizer_and_avagrad_group():
    params = tree_params()
    labels = {"w": "ava", "b": "bound", "s": "ava"}
    txs = {"ava": make("avagrad"), "bound": make("adabound")}
    multi = optax.multi_transform(txs, labels)
    got, _ = _run_steps(multi, params, steps=4)

    ava_only = {"w": params["w"], "s": params["s"]}
    ava_traj, _ = _run_steps(make("avagrad"), ava_only, steps=4)
    bound_traj, _ = _run_steps(make("adabound"), {"b": params["b"]}, steps=4)
    whole, _ = _run_steps(make("avagrad"), params, steps=4)
    for t in range(4):
        np.testing.assert_allclose(got[t]["w"], ava_traj[t]["w"], rtol=1e-6)
        np.testing.assert_allclose(got[t]["s"], ava_traj[t]["s"], rtol=1e-6)
        np.testing.assert_allclose(got[t]["b"], bound_traj[t]["b"], rtol=1e-6)
    # the AvaGrad normalization is per group: the partition changes the w updates from step 2 on
    assert not np.allclose(got[2]["w"], whole[2]["w"], rtol=1e-4)


def test_masked_leaves_drop_out_of_the_avagrad_normalization():
    params = tree_params()
    mask = {"w": True, "b": False, "s": True}
    masked = optax.masked(po.scale_by_avagrad(eps=1e-3), mask)
    alone = po.scale_by_avagrad(eps=1e-3)
    sub = {"w": params["w"], "s": params["s"]}
    ms, al = masked.init(params), alone.init(sub)
    for t in range(3):
        g = tree_grads(params, t)
        u_m, ms = masked.update(g, ms, params)
        u_a, al = alone.update({"w": g["w"], "s": g["s"]}, al, sub)
        np.testing.assert_allclose(u_m["w"], u_a["w"], rtol=1e-6)
        np.testing.assert_array_equal(u_m["b"], g["b"])  # masked leaf passes through
    np.testing.assert_allclose(float(ms.inner_state.gamma), float(al.gamma), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
def _mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (forced CPU) devices; tests/conftest.py sets XLA_FLAGS")
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


@pytest.mark.parametrize("name", NAMES)
def test_sharding_explicit_mesh(name):
    """State types (incl. sharding) equal before/after update; updates sharded like params."""
    mesh = _mesh()
    sharding = jax.sharding.NamedSharding(mesh, jax.P(None, "x"))
    tx = make(name)
    with jax.set_mesh(mesh):
        params = {
            "a": jnp.linspace(-1, 1, 64, dtype=jnp.float32).reshape(2, 8, 4),
            "b": jnp.ones((3,), jnp.float32),
        }
        params["a"] = jax.device_put(params["a"], sharding)
        state0 = tx.init(params)
        update = jax.jit(tx.update)
        grads = jax.tree.map(lambda p: p * 0.3 + 0.1, params)
        _, state1 = update(grads, state0, params)
        updates, state2 = update(grads, state1, params)
        assert jax.tree.map(jax.typeof, state0) == jax.tree.map(jax.typeof, state2)
        assert jax.typeof(updates["a"]) == jax.typeof(params["a"])
        assert updates["a"].sharding.is_equivalent_to(params["a"].sharding, 3)
    # same numbers as on one device
    host = jax.tree.map(np.asarray, params)
    s = tx.init(host)
    _, s = tx.update(jax.tree.map(np.asarray, grads), s, host)
    expected, _ = tx.update(jax.tree.map(np.asarray, grads), s, host)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), updates, expected)


def test_sharding_auto_mesh_data_parallel_style():
    """Params placed with device_put on an auto-axes mesh keep their sharding through jit."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.P("x"))
    params = {"a": jax.device_put(jnp.arange(16.0).reshape(8, 2), sharding), "b": jnp.ones(3)}
    for tx in (make("avagrad"), make("adabound")):
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(params, state, params)
        updates, state = jax.jit(tx.update)(params, state, params)
        assert updates["a"].sharding.is_equivalent_to(sharding, 2)
        mu = state[1].mu["a"]
        assert mu.sharding.is_equivalent_to(sharding, 2)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["avagrad", "avagrad_paper", "avagradw", "adabound", "amsbound"])
def test_first_steps_produce_no_nan_or_inf_anywhere(name):
    """Run the first two updates op by op with jax_debug_nans/infs: any NaN or inf produced by
    any primitive (also inside the branch a `where` discards) raises. Gradients through the
    update are finite too."""
    tx = make(name)
    params = tree_params()
    state = tx.init(params)
    with jax.debug_nans(True), jax.debug_infs(True), jax.disable_jit():
        for t in range(2):
            _, state = tx.update(tree_grads(params, t), state, params)

    def total(grads):
        updates, _ = tx.update(grads, tx.init(params), params)
        return sum(jnp.sum(u) for u in jax.tree.leaves(updates))

    dg = jax.grad(total)(tree_grads(params, 0))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(dg))


def test_avagrad_first_step_guard_with_zero_gradients():
    """v_0 = 0 and g = 0: the guarded step-1 division stays finite for both forms."""
    for form in ("official", "paper"):
        tx = po.avagrad(0.1, eps=1e-6, form=form)
        params = jnp.zeros(5)
        with jax.debug_nans(True), jax.debug_infs(True), jax.disable_jit():
            updates, state = tx.update(jnp.zeros(5), tx.init(params), params)
            updates, state = tx.update(jnp.zeros(5), state, params)
        np.testing.assert_array_equal(updates, 0.0)


def test_adabound_gamma_zero_is_unclipped_and_finite():
    params = tree_params()
    tx = po.adabound(1e-2, final_lr=0.0, gamma=0.0)
    state = tx.init(params)
    with jax.debug_nans(True):
        updates, _ = tx.update(tree_grads(params, 0), state, params)
    # unclipped step 1 with eps ~ 0: -lr * sign(g) (Adam-like)
    g = tree_grads(params, 0)
    jax.tree.map(lambda u, gg: np.testing.assert_allclose(u, -1e-2 * jnp.sign(gg), rtol=1e-4), updates, g)


def test_docstring_examples():
    for module in (_avagrad, _adabound, _csgd):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


def test_csgd_updates_keep_the_gradient_dtype_with_a_wider_buffer():
    """accumulator_dtype widens the momentum buffer only: bf16 gradients give bf16 updates, equal to
    the float32 buffer's value rounded once (NumPy reference of dampened, debiased momentum)."""
    tx = po.csgd(learning_rate=0.1, momentum=0.9, accumulator_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=5).astype(np.float32) for _ in range(3)]
    params = jnp.zeros(5, jnp.bfloat16)
    state, buf = tx.init(params), np.zeros(5)
    for t, g in enumerate(grads, 1):
        g16 = jnp.asarray(g, jnp.bfloat16)
        updates, state = tx.update(g16, state, params)
        buf = 0.9 * buf + 0.1 * np.asarray(g16, np.float64)
        assert updates.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(updates, np.float64), -0.1 * buf / (1 - 0.9 ** t), rtol=1e-2)
    assert {x.dtype for x in jax.tree.leaves(state) if np.ndim(x)} == {jnp.dtype(jnp.float32)}
