"""Folding a SWRN into real loops: equal to the soft net when the coefficients are equal, the scale
rule (conv2 is not scale-free; conv1's factor moves into its BatchNorm), more loops at test time."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pae import sharing as sh
from pae.core import map_nodes

X = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)


def _soft(depth=22, k=2, seed=0):
    cfg = sh.swrn(depth, 1, k)
    variables = cfg.model.init(jax.random.PRNGKey(seed), X)
    latent = cfg.transform.init(variables["params"], jax.random.PRNGKey(seed + 1))
    # non-trivial BatchNorm statistics: one training-mode pass
    _, upd = cfg.model.apply({"params": sh.build(latent), "batch_stats": variables["batch_stats"]}, X,
                             train=True, mutable=["batch_stats"])
    stats = jax.tree.map(lambda m: m, upd["batch_stats"])
    return cfg, latent, stats


def _set_rows(latent, rows_of):
    """Replace coefficient rows: ``rows_of(stage, index, alpha_matrix) -> new row``."""
    mats = {g: np.asarray(a) for g, (_, a) in sh.coefficient_matrices(latent).items()}
    return map_nodes(lambda n: n.replace(coefficients=jnp.asarray(rows_of(n.group, n.index, mats[n.group]),
                                                                  n.coefficients.dtype)),
                     latent, sh.SharedKernel)


def _tie(stage, i, a):
    return a[i % 2]          # every block of the stage = its first shared block (conv1 / conv2 rows)


def test_folded_net_equals_the_soft_net_when_coefficients_are_equal():
    cfg, latent, stats = _soft()
    latent = _set_rows(latent, _tie)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = sh.fold(cfg, latent, stats, tol=0.0, merge="first")
    assert folded.runs == (((0, 1),),) * 3 and folded.model.stage_loops() == ((2,),) * 3
    soft_vars = {"params": sh.build(latent), "batch_stats": stats}
    # the looped model's own init has the same structure as the folded variables
    ref = jax.eval_shape(lambda: folded.model.init(jax.random.PRNGKey(0), X))
    assert jax.tree.structure(ref) == jax.tree.structure(folded.variables)
    jax.tree.map(lambda a, b: a.shape == b.shape or pytest.fail("shape"), ref, folded.variables)
    assert sh.num_parameters(folded.variables["params"]) < sh.num_parameters(soft_vars["params"])

    soft_eval = jax.jit(lambda v, x: cfg.model.apply(v, x, train=False))(soft_vars, X)
    fold_eval = jax.jit(lambda v, x: folded.model.apply(v, x, train=False))(folded.variables, X)
    np.testing.assert_allclose(fold_eval, soft_eval, rtol=1e-5, atol=1e-5)
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0])
    train = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=True, mask=mask,  # noqa: E731
                                                   mutable=["batch_stats"]))
    soft_out, soft_upd = train(cfg.model)(soft_vars, X)
    fold_out, fold_upd = train(folded.model)(folded.variables, X)
    np.testing.assert_allclose(fold_out, soft_out, rtol=1e-5, atol=1e-5)
    # the loop's stacked running statistics are the soft blocks' (repeat r = block 2 + r)
    for r in range(2):
        for bn in ("BatchNorm_0", "BatchNorm_1"):
            np.testing.assert_allclose(fold_upd["batch_stats"]["Loop_1_0"]["body"][bn]["var"][r],
                                       soft_upd["batch_stats"][f"WideBlock_{3 + 1 + r}"][bn]["var"],
                                       rtol=1e-5, atol=1e-6)
    # more iterations at test time: the extra repeats reuse the last repeat's BatchNorm
    more = sh.with_repeats(folded, ((5,), (5,), (5,)))
    body = more.variables["batch_stats"]["Loop_2_0"]["body"]["BatchNorm_1"]["mean"]
    assert body.shape[0] == 5
    np.testing.assert_array_equal(body[4], body[1])
    out5 = jax.jit(lambda v, x: more.model.apply(v, x, train=False))(more.variables, X)
    assert out5.shape == (4, 10) and np.all(np.isfinite(out5))
    assert not np.allclose(out5, fold_eval)
    back = sh.with_repeats(more, ((2,), (2,), (2,)))
    jax.tree.map(np.testing.assert_array_equal, back.variables, folded.variables)


def test_conv2_scale_is_not_free_conv1_scale_moves_into_its_batchnorm():
    cfg, latent, stats = _soft()
    c = -2.5

    def scaled(stage, i, a, which):
        row = a[i % 2]
        return row * c if i == 2 + which else row   # block 2 of the stage: conv1 (0) or conv2 (1)

    # conv1 scaled: merged only with absorb_scale, and then the eval output is the soft one up to eps
    lat1 = _set_rows(latent, lambda s, i, a: scaled(s, i, a, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apart = sh.fold(cfg, lat1, stats)
    assert [str(w.message).split(" merges")[0] for w in caught] == [f"fold: {s}" for s in sh.STAGES]
    assert "merges nothing at tol=0.001" in str(caught[0].message)
    assert apart.model.stage_loops() == ((1, 1),) * 3
    folded = sh.fold(cfg, lat1, stats, absorb_scale=True, merge="first")
    assert folded.model.stage_loops() == ((2,),) * 3
    soft = cfg.model.apply({"params": sh.build(lat1), "batch_stats": stats}, X, train=False)
    out = folded.model.apply(folded.variables, X, train=False)
    np.testing.assert_allclose(out, soft, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(apart.model.apply(apart.variables, X, train=False), soft,
                               rtol=1e-5, atol=1e-5)   # unmerged folding changes nothing either
    # conv2 scaled (feeds the residual sum): never merged
    lat2 = _set_rows(latent, lambda s, i, a: scaled(s, i, a, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f2 = sh.fold(cfg, lat2, stats, absorb_scale=True)
    assert len(caught) == 3 and all(issubclass(w.category, UserWarning) for w in caught)
    assert f2.model.stage_loops() == ((1, 1),) * 3
    np.testing.assert_allclose(f2.distances["stage2"][1], abs(c - 1), rtol=1e-5)


def test_runs_tolerance_and_mean_merge_on_a_deeper_net():
    cfg = sh.swrn(28, 1, 3)
    variables = jax.eval_shape(lambda: cfg.model.init(jax.random.PRNGKey(0), X))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["params"])
    stats = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables["batch_stats"])
    latent = cfg.transform.init(params, jax.random.PRNGKey(3))
    mats = {g: np.asarray(a) for g, (_, a) in sh.coefficient_matrices(latent).items()}
    eps = np.array([1e-4, -2e-4, 0.0], np.float32)

    def rows(stage, i, a):   # blocks [A, A + eps, B] in stage1; [A, B, B] in stage2; all apart in stage3
        b = i // 2
        if stage == "stage1":
            return a[i % 2] + (eps if b == 1 else 0) if b < 2 else a[i]
        if stage == "stage2":
            return a[i] if b < 1 else a[2 + i % 2]
        return a[i]

    latent = _set_rows(latent, rows)
    with pytest.warns(UserWarning, match="stage3 merges nothing"):
        folded = sh.fold(cfg, latent, stats, tol=1e-3)
    assert folded.runs[0] == ((0, 1), (2,)) and folded.runs[1] == ((0,), (1, 2))
    assert folded.runs[2] == ((0,), (1,), (2,))
    a1 = mats["stage1"][0] + (mats["stage1"][0] + eps)
    want = sh.combine(jnp.asarray(a1 / 2), latent.banks["stage1"])
    np.testing.assert_allclose(folded.variables["params"]["Loop_0_0"]["kernel1"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded.distances["stage1"][1],
                               np.linalg.norm(eps) / np.linalg.norm(mats["stage1"][0]), rtol=1e-3)
    assert sh.fold(cfg, latent, stats, tol=1.0e9).runs[2] == ((0, 1, 2),)
    with pytest.raises(ValueError, match="merge must be one of"):
        sh.fold(cfg, latent, stats, merge="max")
    with pytest.raises(ValueError, match="tol must be finite and >= 0"):
        sh.fold(cfg, latent, stats, tol=-1.0)
    with pytest.raises(TypeError, match="cfg must be a pae.sharing.SWRN"):
        sh.fold("SWRN-28-1-3", latent, stats)
    with pytest.raises(ValueError, match="one count per loop"):
        sh.with_repeats(folded, ((2,), (2,), (2,)))


def test_bad_tol_and_loops_raise_errors_naming_the_argument():
    cfg, latent, stats = _soft()
    latent = _set_rows(latent, _tie)
    for bad in (None, "0.1", [0.1], True):
        with pytest.raises(TypeError, match="tol must be a real number >= 0"):
            sh.fold(cfg, latent, stats, tol=bad)
    folded = sh.fold(cfg, latent, stats, tol=jnp.float32(0.0), merge="first")
    for bad in (None, 3, (("a",), (1,), (1,)), ((2.5,), (2,), (2,))):
        with pytest.raises(TypeError, match="loops must be per stage a tuple of int repeat counts"):
            sh.with_repeats(folded, bad)
    assert sh.with_repeats(folded, [[np.int64(3)], [2], [2]]).model.stage_loops() == ((3,), (2,), (2,))


def test_batch_stats_must_be_the_soft_nets_statistics():
    """The whole variables dict, None or another SWRN's statistics failed deep inside (KeyError,
    TypeError) or were accepted; each is refused naming batch_stats."""
    cfg, latent, stats = _soft(depth=16)
    other = sh.swrn(22, 1, 2).model.init(jax.random.PRNGKey(0), X)["batch_stats"]
    with pytest.raises(TypeError, match="batch_stats must be the soft net's BatchNorm statistics"):
        sh.fold(cfg, latent, None)
    with pytest.raises(TypeError, match="batch_stats must be"):
        sh.fold(cfg, latent, [stats])
    with pytest.raises(ValueError, match=r"batch_stats does not match .* SWRN-16-1-2.*missing"):
        sh.fold(cfg, latent, {"params": sh.build(latent), "batch_stats": stats})
    with pytest.raises(ValueError, match=r"batch_stats does not match .*unexpected \['WideBlock_6/"):
        sh.fold(cfg, latent, other)
    two_runs = jax.tree.map(lambda s: jnp.stack([s, s]), stats)
    with pytest.raises(ValueError, match=r"wrong shapes \['BatchNorm_0/mean: \(2, 64\) \(want \(64,\)\)"):
        sh.fold(cfg, latent, two_runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = sh.fold(cfg, latent, dict(stats))
    np.testing.assert_array_equal(folded.variables["batch_stats"]["BatchNorm_0"]["mean"],
                                  stats["BatchNorm_0"]["mean"])
