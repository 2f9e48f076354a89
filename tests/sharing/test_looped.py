"""Looped and unrolled algorithmic nets: the shift conv vs NumPy, the loop vs its unrolled copy, the
progressive loss's cut, folding a template-bank net into one loop (exact when coefficients are equal)."""
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pae import sharing as sh
from pae.core import map_nodes
from pae.models import looped as L


def _np_conv(x, kernel):
    """'same' cross-correlation with a 3-wide (3x3) kernel [3, (3,) C, F], zero padding, in NumPy."""
    spatial = x.ndim - 2
    xp = np.pad(x, [(0, 0)] + [(1, 1)] * spatial + [(0, 0)])
    out = np.zeros(x.shape[:-1] + (kernel.shape[-1],))
    for pos in itertools.product(*[range(n) for n in x.shape[1:-1]]):
        for offs in itertools.product(range(3), repeat=spatial):
            src = tuple(p + o for p, o in zip(pos, offs))
            out[(slice(None),) + pos] += xp[(slice(None),) + src] @ kernel[offs]
    return out


@pytest.mark.parametrize("shape", [(3, 7, 2), (2, 5, 4, 3)])
def test_shift_conv_is_a_same_padded_convolution(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    conv = L.ShiftConv(5)
    v = conv.init(jax.random.PRNGKey(0), x)
    kernel = np.asarray(v["params"]["kernel"], np.float64)
    assert kernel.shape == (3,) * (len(shape) - 2) + (shape[-1], 5)
    np.testing.assert_allclose(jax.jit(conv.apply)(v, x), _np_conv(x.astype(np.float64), kernel),
                               rtol=1e-5, atol=1e-5)


def _tied_unrolled(loop_params, depth):
    block = loop_params["Loop"]["Block"]
    return {"Projection": loop_params["Projection"], "Head": loop_params["Head"],
            **{f"Block_{d}": block for d in range(depth)}}


def test_loop_equals_its_unrolled_copy_and_iterate_reads_every_count():
    x = np.random.default_rng(1).integers(0, 2, (4, 11, 1)).astype(np.float32)
    net = L.LoopedNet(width=6, iters=5, blocks=2)
    params = net.init(jax.random.PRNGKey(0), x)["params"]
    out = net.apply({"params": params}, x)
    assert out.shape == (4, 11, 2)
    unrolled = L.UnrolledNet(width=6, depth=5, blocks=2)
    ref = unrolled.apply({"params": _tied_unrolled(params, 5)}, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    outs = L.iterate(net, params, x, [2, 5, 9])
    np.testing.assert_allclose(outs[5], out, rtol=1e-5, atol=1e-5)
    for n in (2, 9):
        np.testing.assert_allclose(outs[n], L.LoopedNet(6, n, 2).apply({"params": params}, x),
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[2], outs[9])
    # one set of weights runs on inputs of any size: 2-D (mazes) too
    m = L.LoopedNet(width=4, iters=3, blocks=1)
    xm = np.random.default_rng(2).normal(size=(2, 5, 5, 3)).astype(np.float32)
    pm = m.init(jax.random.PRNGKey(1), xm)["params"]
    assert m.apply({"params": pm}, np.zeros((1, 9, 9, 3), np.float32)).shape == (1, 9, 9, 2)
    with pytest.raises(ValueError, match="iterations must be ints >= 1"):
        L.iterate(net, params, x, [0, 3])
    with pytest.raises(TypeError, match="must be a LoopedNet"):
        L.iterate(unrolled, params, x, [3])
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        L.LoopedNet(4, 0).init(jax.random.PRNGKey(0), x)


def test_progressive_training_runs_n_cut_iterations_then_k_with_gradients():
    x = np.random.default_rng(3).integers(0, 2, (3, 9, 1)).astype(np.float32)
    net = L.LoopedNet(width=5, iters=3, blocks=1)
    params = net.init(jax.random.PRNGKey(0), x)["params"]
    proj, block, head = L.Projection(5), L.RecurBlock(5, 1), L.Head(5)
    seen = set()
    for seed in range(6):
        key = jax.random.PRNGKey(seed)
        _, sown = net.apply({"params": params}, x, train=True, rngs={"dropout": key},
                            mutable=["intermediates"])
        n, k = (int(v) for v in sown["intermediates"]["progressive"][0])
        assert 0 <= n < 3 and 1 <= k <= 3 - n
        seen.add(n > 0)

        def loss(p):
            return jnp.sum(net.apply({"params": p}, x, train=True, rngs={"dropout": key}) ** 2)

        def reference(p):   # n iterations outside the gradient, then k with it
            h = proj.apply({"params": p["Projection"]}, x)
            for i in range(n + k):
                if i == n and n > 0:
                    h = jax.lax.stop_gradient(h)
                h = block.apply({"params": p["Loop"]["Block"]}, h, x)
            return jnp.sum(head.apply({"params": p["Head"]}, h) ** 2)

        np.testing.assert_allclose(loss(params), reference(params), rtol=1e-5)
        g, r = jax.grad(loss)(params), jax.grad(reference)(params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), g, r)
        proj_grad = float(jnp.abs(g["Projection"]["Conv_0"]["kernel"]).sum())
        assert (proj_grad == 0.0) == (n > 0)      # the cut: no gradient reaches the projection
    assert seen == {True, False}


def test_unrolled_progressive_trains_only_blocks_n_to_n_plus_k_and_equals_the_loop_when_tied():
    x = np.random.default_rng(4).integers(0, 2, (3, 9, 1)).astype(np.float32)
    depth = 4
    unrolled = L.UnrolledNet(width=5, depth=depth, blocks=1, progressive=True)
    looped = L.LoopedNet(width=5, iters=depth, blocks=1)
    lp = looped.init(jax.random.PRNGKey(1), x)["params"]
    tied = {"Projection": lp["Projection"], "Head": lp["Head"],
            **{f"Block_{d}": lp["Loop"]["Block"] for d in range(depth)}}
    up = unrolled.init(jax.random.PRNGKey(2), x)["params"]
    # evaluation runs every block, whatever progressive says
    plain = L.UnrolledNet(width=5, depth=depth, blocks=1)
    np.testing.assert_array_equal(unrolled.apply({"params": up}, x), plain.apply({"params": up}, x))
    seen = set()
    for seed in range(8):
        rngs = {"dropout": jax.random.PRNGKey(seed)}
        _, sown = unrolled.apply({"params": up}, x, train=True, rngs=rngs, mutable=["intermediates"])
        n, k = (int(v) for v in sown["intermediates"]["progressive"][0])
        seen.add((n, k))
        # tied weights: exactly the loop's progressive training, same draw of (n, k)
        _, lsown = looped.apply({"params": lp}, x, train=True, rngs=rngs, mutable=["intermediates"])
        assert [int(v) for v in lsown["intermediates"]["progressive"][0]] == [n, k]
        np.testing.assert_allclose(unrolled.apply({"params": tied}, x, train=True, rngs=rngs),
                                   looped.apply({"params": lp}, x, train=True, rngs=rngs), rtol=1e-5, atol=1e-6)
        # distinct weights: a reference that runs blocks 0..n+k-1 and cuts before block n
        block, proj, head = L.RecurBlock(5, 1), L.Projection(5), L.Head(5)

        def reference(p):
            h = proj.apply({"params": p["Projection"]}, x)
            for d in range(n + k):
                if d == n and n > 0:
                    h = jax.lax.stop_gradient(h)
                h = block.apply({"params": p[f"Block_{d}"]}, h, x)
            return jnp.sum(head.apply({"params": p["Head"]}, h) ** 2)

        def loss(p):
            return jnp.sum(unrolled.apply({"params": p}, x, train=True, rngs=rngs) ** 2)

        np.testing.assert_allclose(loss(up), reference(up), rtol=1e-5)
        g = jax.grad(loss)(up)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), g,
                     jax.grad(reference)(up))
        trained = {d for d in range(depth) if float(jnp.abs(g[f"Block_{d}"]["Recall"]["kernel"]).sum()) > 0}
        assert trained == set(range(n, n + k))
    assert len({n for n, _ in seen}) > 1


def _bank(depth=4, k=2, blocks=1, width=5, seed=0):
    x = np.random.default_rng(seed).integers(0, 2, (3, 10, 1)).astype(np.float32)
    net = L.UnrolledNet(width, depth, blocks)
    params = net.init(jax.random.PRNGKey(seed), x)["params"]
    t = sh.templates(L.block_groups(blocks), k, pull=1.0, pull_period=1)
    return x, net, t, t.init(params, jax.random.PRNGKey(seed + 1))


def test_bank_over_iterations_counts_and_folds_exactly_when_coefficients_are_equal():
    x, net, t, latent = _bank(depth=4, k=2, blocks=1, width=5)
    assert sorted(sh.layer_paths(latent)) == ["Recall", "Res_0_0", "Res_0_1"]
    assert sh.layer_paths(latent)["Recall"] == [f"Block_{d}/Recall/kernel" for d in range(4)]
    plain = sh.num_parameters(net.init(jax.random.PRNGKey(0), x)["params"])
    conv = lambda cin: 3 * cin * 5  # noqa: E731
    per_block = conv(6) + 2 * conv(5)
    assert sh.num_parameters(latent) == plain - 4 * per_block + 2 * per_block + 3 * 4 * 2
    # tie every iteration's coefficients to iteration 0's: the pull vanishes, the fold is exact
    mats = {g: np.asarray(a) for g, (_, a) in sh.coefficient_matrices(latent).items()}
    tied = map_nodes(lambda n: n.replace(coefficients=jnp.asarray(mats[n.group][0])), latent, sh.SharedKernel)
    assert float(t.penalty(tied, None)) == 0.0 and float(t.penalty(latent, None)) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        looped, params, dist = sh.fold_unrolled(net, tied, tol=0.0)
    assert dist == 0.0 and looped.iters == 4
    soft = net.apply({"params": sh.build(tied)}, x)
    np.testing.assert_allclose(looped.apply({"params": params}, x), soft, rtol=1e-5, atol=1e-5)
    assert sh.num_parameters(params) < sh.num_parameters(sh.build(tied))
    # more iterations at test time: the same loop, run longer
    longer = L.iterate(looped, params, x, [4, 7])
    np.testing.assert_allclose(longer[4], soft, rtol=1e-5, atol=1e-5)


def test_fold_unrolled_warns_when_iterations_differ_and_names_bad_input():
    x, net, t, latent = _bank(depth=3, k=2)
    with pytest.warns(UserWarning, match="the 3 iterations do not coincide at tol=0.01"):
        looped, params, dist = sh.fold_unrolled(net, latent, tol=1e-2)
    mats = {g: np.asarray(a, np.float64) for g, (_, a) in sh.coefficient_matrices(latent).items()}
    want = max(np.linalg.norm(r - a.mean(0)) / np.linalg.norm(a.mean(0)) for a in mats.values() for r in a)
    assert dist == pytest.approx(want, rel=1e-6)
    with pytest.raises(TypeError, match="must be a pae.models.looped.UnrolledNet"):
        sh.fold_unrolled(L.LoopedNet(5, 3, 1), latent)
    with pytest.raises(ValueError, match="merge must be one of"):
        sh.fold_unrolled(net, latent, merge="median")
    with pytest.raises(ValueError, match="folds from the groups"):
        sh.fold_unrolled(L.UnrolledNet(5, 3, 2), latent)
    with pytest.raises(ValueError, match="tol must be finite"):
        sh.fold_unrolled(net, latent, tol=-1.0)
