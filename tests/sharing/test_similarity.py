"""Layer similarity matrices against NumPy; the heatmap helper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pae import sharing as sh
from pae.core import select as S


def _np_lsm(a):
    a = np.asarray(a, np.float64)
    out = np.zeros((len(a), len(a)))
    for i in range(len(a)):
        for j in range(len(a)):
            ni, nj = np.linalg.norm(a[i]), np.linalg.norm(a[j])
            out[i, j] = abs(a[i] @ a[j]) / (ni * nj) if ni * nj > 0 else 0.0
    return out


def _latent(rng, layers=(5, 3), k=4):
    params = {f"g{g}_l{i}": {"kernel": np.zeros((2, 3), np.float32)} for g, n in enumerate(layers)
              for i in range(n)}
    t = sh.templates({f"g{g}": S.path(rf"^g{g}_") for g in range(len(layers))}, k)
    latent = t.init(params, jax.random.PRNGKey(0))
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), latent)


def test_lsm_matches_numpy_with_equal_scaled_flipped_and_zero_rows():
    rng = np.random.default_rng(0)
    latent = _latent(rng)
    alpha = {g: np.asarray(a) for g, (_, a) in sh.coefficient_matrices(latent).items()}
    # make row 3 of g0 = -2.5 * row 1 (|cos| = 1), row 4 zero
    def edit(n):
        if n.group == "g0" and n.index == 3:
            return n.replace(coefficients=-2.5 * jnp.asarray(alpha["g0"][1]))
        if n.group == "g0" and n.index == 4:
            return n.replace(coefficients=jnp.zeros_like(n.coefficients))
        return n
    from pae.core import map_nodes
    latent = map_nodes(edit, latent, sh.SharedKernel)
    lsm = jax.jit(sh.layer_similarity)(latent)
    assert sorted(lsm) == ["g0", "g1"] and lsm["g0"].shape == (5, 5) and lsm["g1"].shape == (3, 3)
    for g, (_, a) in sh.coefficient_matrices(latent).items():
        np.testing.assert_allclose(lsm[g], _np_lsm(a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lsm["g0"][1, 3], 1.0, rtol=1e-6)
    assert float(lsm["g0"][4, 4]) == 0.0 and float(lsm["g0"][2, 2]) == pytest.approx(1.0, abs=1e-6)


def test_lsm_is_identity_at_the_official_init_when_k_is_at_least_the_layers():
    params = {f"l{i}": {"kernel": np.zeros((3, 3, 4, 4), np.float32)} for i in range(6)}
    latent = sh.templates({"g": S.path("^l")}, 6).init(params, jax.random.PRNGKey(1))
    np.testing.assert_allclose(sh.layer_similarity(latent)["g"], np.eye(6), atol=1e-5)
    latent1 = sh.templates({"g": S.path("^l")}, 1).init(params, jax.random.PRNGKey(1))
    np.testing.assert_allclose(sh.layer_similarity(latent1)["g"], np.ones((6, 6)), rtol=1e-6)


def test_lsm_keeps_a_leading_run_axis():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 4, 2)).astype(np.float32)
    got = jax.jit(sh.similarity_matrix)(a)
    for r in range(3):
        np.testing.assert_allclose(got[r], _np_lsm(a[r]), rtol=1e-5, atol=1e-6)


def test_plot_similarity_writes_one_heatmap_per_group(tmp_path):
    rng = np.random.default_rng(3)
    latent = _latent(rng)
    lsm = sh.layer_similarity(latent)
    fig = sh.plot_similarity(lsm, tmp_path / "lsm.png", labels=sh.layer_paths(latent), title="t")
    assert (tmp_path / "lsm.png").stat().st_size > 1000
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    np.testing.assert_allclose(images[0].get_array(), lsm["g0"])
    import matplotlib.pyplot as plt
    plt.close(fig)
    with pytest.raises(ValueError, match="square"):
        sh.plot_similarity({"g": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="no sharing group"):
        sh.plot_similarity({})


def test_bad_input_is_refused_instead_of_giving_nothing():
    """Plain params (no sharing layer) gave {}; a 1-D vector a meaningless [..., L, L]."""
    rng = np.random.default_rng(3)
    latent = _latent(rng)
    with pytest.raises(ValueError, match="latent holds no sharing layer"):
        sh.layer_similarity(sh.build(latent))
    with pytest.raises(ValueError, match="latent holds no sharing layer"):
        sh.layer_similarity({"kernel": np.ones((2, 3))})
    for bad in (np.ones(3), np.float32(1.0), [1.0, 2.0]):
        with pytest.raises(ValueError, match=r"alpha must be a coefficient matrix \[\.\.\., L, k\]"):
            sh.similarity_matrix(bad)
    a = rng.normal(size=(4, 3))
    np.testing.assert_allclose(sh.similarity_matrix(a), _np_lsm(a), rtol=1e-5, atol=1e-6)
