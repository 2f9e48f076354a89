"""Template banks: apply vs NumPy, gradients, initialization statistics, roles, counts, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pae import sharing as sh
from pae import sparsity as sp
from pae.core import Context, chain, label_roles, role_optimizer, select as S


def _tree(rng):
    """Awkward shapes; group "a": three (3, 2, 5, 7) kernels (one at Block_10, to check natural
    order), group "b": two (13, 4) kernels; the rest unshared."""
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return {"Block_2": {"conv": {"kernel": f(3, 2, 5, 7)}, "bias": f(7)},
            "Block_10": {"conv": {"kernel": f(3, 2, 5, 7)}},
            "Block_3": {"conv": {"kernel": f(3, 2, 5, 7)}, "dense": {"kernel": f(13, 4)}},
            "head": {"kernel": f(13, 4), "bias": f(4)},
            "stem": {"kernel": f(1, 1, 5, 7)}}


GROUPS = {"a": S.path(r"Block_\d+/conv/kernel"), "b": S.path(r"(dense|head)/kernel")}
A_ORDER = ["Block_2/conv/kernel", "Block_3/conv/kernel", "Block_10/conv/kernel"]
B_ORDER = ["Block_3/dense/kernel", "head/kernel"]


@pytest.mark.parametrize("k", [1, 2, 5])
def test_apply_equals_numpy_sum_of_templates_on_random_latents(k):
    rng = np.random.default_rng(k)
    params = _tree(rng)
    t = sh.templates(GROUPS, k)
    latent = t.init(params, jax.random.PRNGKey(0))
    assert isinstance(latent, sh.SharedParams)
    mats = sh.coefficient_matrices(latent)
    assert mats["a"][0] == A_ORDER and mats["b"][0] == B_ORDER
    # random templates and coefficients in the latent's structure
    latent = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), latent)
    out = jax.jit(t.apply)(latent, Context.make())
    alpha = {g: np.asarray(m[1], np.float64) for g, m in sh.coefficient_matrices(latent).items()}
    for g, order in (("a", A_ORDER), ("b", B_ORDER)):
        bank = np.asarray(latent.banks[g], np.float64)
        assert bank.shape[0] == k
        for i, path in enumerate(order):
            want = sum(alpha[g][i, j] * bank[j] for j in range(k))
            got = out
            for key in path.split("/"):
                got = got[key]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # unshared leaves pass through untouched; finalize is apply
    np.testing.assert_array_equal(out["stem"]["kernel"], latent.params["stem"]["kernel"])
    np.testing.assert_array_equal(out["head"]["bias"], latent.params["head"]["bias"])
    fin = jax.jit(t.finalize)(latent, Context.make())
    jax.tree.map(np.testing.assert_array_equal, fin, out)
    assert jax.tree.structure(out) == jax.tree.structure(params)


def test_gradients_of_templates_and_coefficients_match_numpy():
    rng = np.random.default_rng(1)
    params = _tree(rng)
    t = sh.templates(GROUPS, 3)
    latent = t.init(params, jax.random.PRNGKey(1))
    g_w = {p: rng.normal(size=(3, 2, 5, 7)) for p in A_ORDER}   # dL/dW_i of a linear loss

    def loss(lat):
        out = t.apply(lat, None)
        return sum(jnp.sum(out[p.split("/")[0]]["conv"]["kernel"] * g_w[p]) for p in A_ORDER)

    grads = jax.jit(jax.grad(loss))(latent)
    alpha = np.asarray(sh.coefficient_matrices(latent)["a"][1], np.float64)
    bank = np.asarray(latent.banks["a"], np.float64)
    g_alpha = np.asarray(sh.coefficient_matrices(grads)["a"][1])
    for i, p in enumerate(A_ORDER):
        np.testing.assert_allclose(g_alpha[i], [np.sum(g_w[p] * bank[j]) for j in range(3)], rtol=1e-4)
    want_bank = np.stack([sum(alpha[i, j] * g_w[p] for i, p in enumerate(A_ORDER)) for j in range(3)])
    np.testing.assert_allclose(grads.banks["a"], want_bank, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(grads.banks["b"], 0.0)


@pytest.mark.parametrize("layers,k", [(6, 2), (3, 8)])
def test_init_he_normal_templates_per_template_fan_in_and_orthogonal_coefficients(layers, k):
    shape = (3, 3, 48, 40)
    params = {f"l{i}": {"kernel": np.zeros(shape, np.float32)} for i in range(layers)}
    params["other"] = {"kernel": np.full((2, 2), 7.0, np.float32)}
    t = sh.templates({"g": S.path(r"^l\d/kernel")}, k)
    latent = jax.jit(t.init)(params, jax.random.PRNGKey(3))
    bank = np.asarray(latent.banks["g"], np.float64)
    assert bank.shape == (k,) + shape and latent.banks["g"].dtype == jnp.float32
    std = np.sqrt(2.0 / (3 * 3 * 48))          # fan-in of one template (not k times it)
    z = bank / std
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert np.abs(z).max() > 3.5               # untruncated (JAX's he_normal cuts at 2 sigma)
    for j in range(k):                          # each template drawn on its own, not one scaled draw
        assert abs(z[j].std() - 1) < 0.05
    alpha = np.asarray(sh.coefficient_matrices(latent)["g"][1], np.float64)
    assert alpha.shape == (layers, k)
    gram = alpha.T @ alpha if layers >= k else alpha @ alpha.T
    np.testing.assert_allclose(gram, np.eye(min(layers, k)), atol=1e-5)
    np.testing.assert_array_equal(latent.params["other"]["kernel"], 7.0)
    assert not np.allclose(alpha, 0)


@pytest.mark.parametrize("layers,k", [(6, 1), (6, 2), (3, 8)])
def test_unit_rows_init_is_the_orthogonal_draw_with_rows_normalized_and_signed(layers, k):
    params = {f"l{i}": {"kernel": np.zeros((3, 4, 5), np.float32)} for i in range(layers)}
    group = {"g": S.path(r"^l\d/kernel")}
    key = jax.random.PRNGKey(5)
    ortho = np.asarray(sh.coefficient_matrices(sh.templates(group, k).init(params, key))["g"][1], np.float64)
    latent = sh.templates(group, k, coefficient_init="unit_rows").init(params, key)
    alpha = np.asarray(sh.coefficient_matrices(latent)["g"][1], np.float64)
    want = ortho / np.linalg.norm(ortho, axis=1, keepdims=True) * np.sign(ortho[:, :1])
    np.testing.assert_allclose(alpha, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(alpha, axis=1), 1.0, rtol=1e-5)
    assert np.all(alpha[:, 0] > 0)
    if k == 1:      # every layer starts equal to the template: a loop at initialization
        built = sh.build(latent)
        for i in range(layers):
            np.testing.assert_allclose(built[f"l{i}"]["kernel"], latent.banks["g"][0], rtol=1e-6)
    with pytest.raises(ValueError, match="coefficient_init must be one of"):
        sh.templates(group, k, coefficient_init="zeros")


def test_templates_from_layers_start_as_the_first_k_layers_own_kernels():
    rng = np.random.default_rng(8)
    params = {f"l{i}": {"kernel": rng.normal(size=(3, 4, 5)).astype(np.float32)} for i in range(4)}
    group = {"g": S.path(r"^l\d/kernel")}
    latent = sh.templates(group, 2, templates_from="layers").init(params, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(latent.banks["g"], np.stack([params["l0"]["kernel"], params["l1"]["kernel"]]))
    tied = sh.templates(group, 1, coefficient_init="unit_rows", templates_from="layers")
    built = sh.build(tied.init(params, jax.random.PRNGKey(0)))
    for i in range(4):      # k = 1, unit rows: the loop of the first layer
        np.testing.assert_allclose(built[f"l{i}"]["kernel"], params["l0"]["kernel"], rtol=1e-6)
    with pytest.raises(ValueError, match="group 'g' has 4 layers for k=5 templates"):
        sh.templates(group, 5, templates_from="layers").init(params, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="templates_from must be one of"):
        sh.templates(group, 1, templates_from="ones")


def test_coefficients_have_their_own_role_and_no_weight_decay():
    params = _tree(np.random.default_rng(2))
    latent = sh.templates(GROUPS, 2).init(params, jax.random.PRNGKey(0))
    roles = label_roles(latent)
    assert sorted(set(jax.tree.leaves(roles))) == ["coefficients", "weights"]
    shared = [n for n in jax.tree.leaves(roles.params, is_leaf=lambda x: isinstance(x, sh.SharedKernel))
              if isinstance(n, sh.SharedKernel)]
    assert len(shared) == 5 and all(n.coefficients == "coefficients" for n in shared)
    tx = role_optimizer({"weights": optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1)),
                         "coefficients": optax.sgd(0.1)})
    zeros = jax.tree.map(jnp.zeros_like, latent)
    updates, _ = tx.update(zeros, tx.init(latent), latent)
    new = optax.apply_updates(latent, updates)
    for (_, a_old), (_, a_new) in zip(sh.coefficient_matrices(latent).values(),
                                      sh.coefficient_matrices(new).values()):
        np.testing.assert_array_equal(a_new, a_old)                        # no decay
    np.testing.assert_allclose(new.banks["a"], 0.95 * latent.banks["a"], rtol=1e-6)   # decayed
    np.testing.assert_allclose(new.params["stem"]["kernel"], 0.95 * params["stem"]["kernel"], rtol=1e-6)


def test_pull_penalty_matches_numpy():
    params = _tree(np.random.default_rng(4))
    t = sh.templates(GROUPS, 3, pull=0.7, pull_period=2)
    latent = t.init(params, jax.random.PRNGKey(0))
    got = jax.jit(t.penalty)(latent, Context.make())
    want = 0.0
    for _, a in sh.coefficient_matrices(latent).values():
        a = np.asarray(a, np.float64)
        want += sum(np.sum((a[i + 2] - a[i]) ** 2) for i in range(len(a) - 2))
    assert want > 0
    np.testing.assert_allclose(got, 0.7 * want, rtol=1e-5)
    assert float(sh.templates(GROUPS, 3).penalty(latent, None)) == 0.0


def test_group_by_shape_and_chain_with_sparsity_on_the_banks():
    params = _tree(np.random.default_rng(5))
    t = sh.templates(sh.group_by_shape(S.kernels() & S.path("Block|head")), 2)
    latent = t.init(params, jax.random.PRNGKey(0))
    assert sorted(latent.banks) == ["13x4", "3x2x5x7"]
    both = chain(t, sp.continuous_sparsification(S.path(r"^3x2x5x7$"), s_init=0.0))
    lat2 = both.init(params, jax.random.PRNGKey(0))
    assert isinstance(lat2.banks["3x2x5x7"], sp.SoftMask)
    out = jax.jit(both.apply)(lat2, Context.make(beta=1.0))
    # the soft mask is sigmoid(0) / sigmoid(0) = 1 at s_init = 0: same as sharing alone
    ref = t.apply(lat2.replace(banks={**lat2.banks, "3x2x5x7": lat2.banks["3x2x5x7"].weight}), None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), out, ref)


@pytest.mark.parametrize("name,k,params_wrn,params_swrn", [
    ("SWRN-28-10-1", 1, 36_479_194, 12_287_212), ("SWRN-28-10-2", 2, 36_479_194, 17_125_630),
    ("SWRN-28-10-4", 4, 36_479_194, 26_802_466), ("SWRN-28-4-2", 2, 5_849_050, 2_752_510),
    ("swrn28_10_6", 6, 36_479_194, 36_479_302)])
def test_swrn_parameter_counts_equal_the_official_code(name, k, params_wrn, params_swrn):
    cfg = sh.swrn(name)
    assert cfg.k == k and cfg.depth == 28
    variables = jax.eval_shape(lambda: cfg.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    latent = jax.eval_shape(lambda p: cfg.transform.init(p, jax.random.PRNGKey(1)), variables["params"])
    assert sh.num_parameters(variables["params"]) == params_wrn
    assert sh.num_parameters(latent) == params_swrn
    assert round(params_swrn / 1e6, 2) == {"SWRN-28-10-1": 12.29, "SWRN-28-10-2": 17.13,
                                           "SWRN-28-10-4": 26.80, "SWRN-28-4-2": 2.75,
                                           "swrn28_10_6": 36.48}[name]
    paths = sh.layer_paths(latent)
    assert sorted(paths) == list(sh.STAGES)
    for s, stage in enumerate(sh.STAGES):   # blocks 2..4 of the stage, conv1 and conv2 alternating
        assert paths[stage] == [f"WideBlock_{4 * s + b}/Conv_{c}/kernel" for b in (1, 2, 3) for c in (0, 1)]


def test_swrn_names_and_bad_configs():
    assert sh.swrn(16, 2, 3).name == "SWRN-16-2-3"
    with pytest.raises(ValueError, match="SWRN-<depth>-<widen>-<k>"):
        sh.swrn("WRN-28-10")
    with pytest.raises(ValueError, match="depth must be 6n\\+4 with n >= 2"):
        sh.swrn(10, 1, 1)          # one block per stage: nothing to share
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        sh.swrn(16, 1, 0)


def test_bad_input_names_the_group_or_leaf():
    params = _tree(np.random.default_rng(6))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError,
                       match=r"group 'mix' mixes kernels of different shapes.*head/kernel: \(13, 4\)"):
        sh.templates({"mix": S.path(r"(head|Block_2/conv)/kernel")}, 2).init(params, key)
    with pytest.raises(ValueError, match="num_templates must be >= 1, got 0"):
        sh.templates(GROUPS, 0)
    with pytest.raises(TypeError, match="num_templates must be an int"):
        sh.templates(GROUPS, True)
    with pytest.raises(ValueError, match=r"num_templates\['b'\]: num_templates must be >= 1"):
        sh.templates(GROUPS, {"a": 2, "b": -1})
    with pytest.raises(ValueError, match="group 'one' has one layer \\('stem/kernel'\\)"):
        sh.templates({"one": S.path("stem")}, 2).init(params, key)
    with pytest.raises(ValueError, match="group 'none' matches no leaf; available paths: Block_10"):
        sh.templates({"none": S.path("nothing"), **GROUPS}, 2).init(params, key)
    with pytest.raises(ValueError, match="leaf 'head/kernel' is selected by several groups"):
        sh.templates({"x": S.path("head/kernel|dense"), "y": S.path("head/kernel")}, 2).init(params, key)
    with pytest.raises(TypeError, match="groups must be a mapping"):
        sh.templates(3, 2)
    with pytest.raises(ValueError, match="pull must be >= 0"):
        sh.templates(GROUPS, 2, pull=-1.0)
    with pytest.raises(TypeError, match="expected a sharing latent"):
        sh.build(params)


@pytest.mark.parametrize("runs, k", [(2, 3), (3, 3)])
def test_combine_and_build_with_a_leading_run_axis_match_each_run(runs, k):
    """A parallel run's latent (leading run axis on coefficients and banks): each run's weight is
    that run's own ``sum_j alpha_j T_j`` (the template axis is after the run axis, not axis 0)."""
    rng = np.random.default_rng(7)
    c = rng.normal(size=(runs, k)).astype(np.float32)
    bank = rng.normal(size=(runs, k, 4, 3)).astype(np.float32)
    want = np.einsum("rk,rkij->rij", c.astype(np.float64), bank.astype(np.float64))
    np.testing.assert_allclose(sh.combine(jnp.asarray(c), jnp.asarray(bank)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="combine: coefficients of shape"):
        sh.combine(jnp.asarray(c), jnp.asarray(bank[:, :1]))
    t = sh.templates(GROUPS, k)
    one = t.init(_tree(rng), jax.random.PRNGKey(0))
    stacked = jax.tree.map(lambda x: jnp.stack([x] + [2 * x + 1] * (runs - 1)), one)
    out = sh.build(stacked)
    for r in range(runs):
        ref = sh.build(jax.tree.map(lambda x: x[r], stacked))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[r], b, rtol=1e-5, atol=1e-5), out, ref)


def test_num_templates_naming_a_group_that_does_not_exist_is_refused():
    """A typo in a {group: k} mapping was ignored silently (the group got no bank of that size)."""
    params = _tree(np.random.default_rng(7))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"names sharing groups \['c', 'stgae1'\] that match no group; "
                                         r"groups found: \['a', 'b'\]"):
        sh.templates(GROUPS, {"a": 2, "b": 2, "c": 5, "stgae1": 9})
    # a grouper function declares nothing up front: refused at init, against the groups it found
    by_shape = sh.group_by_shape(S.kernels() & S.path("Block|head"))
    t = sh.templates(by_shape, {"13x4": 2, "3x2x5x7": 3, "3x3x5x7": 4})
    with pytest.raises(ValueError, match=r"\['3x3x5x7'\] that match no group; groups found: "
                                         r"\['13x4', '3x2x5x7'\]"):
        t.init(params, key)
    banks = sh.templates(by_shape, {"13x4": 2, "3x2x5x7": 3}).init(params, key).banks
    assert {g: b.shape[0] for g, b in banks.items()} == {"13x4": 2, "3x2x5x7": 3}


def test_pull_penalty_period_must_be_an_int_at_least_one():
    """period 0 gave alpha[0:] - alpha[:-0] (an empty difference: 0), -1 compared other rows."""
    latent = sh.templates(GROUPS, 3).init(_tree(np.random.default_rng(8)), jax.random.PRNGKey(0))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="period must be an int >= 1"):
            sh.pull_penalty(latent, bad)
    a = np.asarray(sh.coefficient_matrices(latent)["a"][1], np.float64)
    b = np.asarray(sh.coefficient_matrices(latent)["b"][1], np.float64)
    want = np.sum((a[1:] - a[:-1]) ** 2) + np.sum((b[1:] - b[:-1]) ** 2)
    np.testing.assert_allclose(float(sh.pull_penalty(latent, np.int64(1))), want, rtol=1e-5)
