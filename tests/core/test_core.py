"""pae.core: selectors, latent-node roles, chain semantics, context; Linen and NNX parameter trees."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import pae
from pae.core import (Context, Transform, chain, identity, label_roles, latent_node, map_nodes,
                      map_selected, role_optimizer)
from pae.core import select as S
from pae.sparsity import SoftMask, continuous_sparsification


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        y = nn.Conv(8, (3, 3), use_bias=False)(x)
        y = nn.BatchNorm(use_running_average=not train)(y)
        y = nn.Conv(8, (3, 3), use_bias=False)(nn.relu(y))
        s = nn.Conv(8, (1, 1), strides=(1, 1), use_bias=False, name="shortcut")(x)
        return nn.relu(y + s)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = Block(name="BasicBlock_0")(x, train)
        return nn.Dense(3)(x.mean((1, 2)))


def _linen_params():
    variables = Net().init(jax.random.PRNGKey(0), jnp.ones((2, 5, 5, 3)))
    return variables


def test_paths_and_selectors_compose():
    params = _linen_params()["params"]
    paths = S.leaf_paths(params)
    assert "BasicBlock_0/Conv_0/kernel" in paths and "Dense_0/bias" in paths
    hit = lambda sel: sorted(p for p, x in zip(paths, jax.tree.leaves(params)) if sel(p, x))  # noqa
    assert hit(S.kernels()) == ["BasicBlock_0/Conv_0/kernel", "BasicBlock_0/Conv_1/kernel",
                                "BasicBlock_0/shortcut/kernel", "Dense_0/kernel"]
    assert hit(S.conv_kernels((3, 3))) == ["BasicBlock_0/Conv_0/kernel", "BasicBlock_0/Conv_1/kernel"]
    assert hit(S.kernels().exclude(S.path("shortcut"), S.path("^Dense"))) == hit(S.conv_kernels((3, 3)))
    assert hit(S.kernels() & S.ndim(2)) == ["Dense_0/kernel"]
    assert hit(S.ndim(min=1, max=1) & ~S.path("BatchNorm")) == ["Dense_0/bias"]
    assert hit(S.path("Dense") | S.path("scale$")) == ["BasicBlock_0/BatchNorm_0/scale",
                                                       "Dense_0/bias", "Dense_0/kernel"]
    assert hit(S.exclude(S.everything())) == []
    assert "shortcut" in repr(S.kernels().exclude(S.path("shortcut")))


def test_conv_kernels_leave_out_attention_projections():
    """Attention's DenseGeneral kernels are 3-D like a 1-D conv's: conv_kernels() is not fooled."""
    from pae.models import get_model

    model = get_model("transformer_lm", 40)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    paths = S.leaf_paths(params)
    hit = [p for p, x in zip(paths, jax.tree.leaves(params)) if S.conv_kernels()(p, x)]
    assert hit == []
    attention = [p for p, x in zip(paths, jax.tree.leaves(params)) if "Attention" in p and p.endswith("kernel")]
    assert attention and all(np.ndim(x) == 3 for p, x in zip(paths, jax.tree.leaves(params)) if p in attention)
    assert len([p for p, x in zip(paths, jax.tree.leaves(params)) if S.kernels()(p, x)]) > len(attention)
    conv = nn.Conv(4, (3,))
    kernel = conv.init(jax.random.PRNGKey(0), jnp.ones((1, 6, 2)))["params"]["kernel"]
    assert S.conv_kernels()("Conv_0/kernel", kernel)          # a 1-D conv still counts


def test_any_of_and_exclude_check_their_selectors():
    for make in (S.any_of, S.exclude, S.kernels().exclude):
        with pytest.raises(TypeError, match=r"selectors\[1\] must be a pae.select.Selector"):
            make(S.kernels(), lambda p, x: True)


def test_selector_matching_nothing_names_selector_and_paths():
    params = _linen_params()["params"]
    with pytest.raises(ValueError, match=r"select=path\('nope'\) matches no leaf.*Dense_0/kernel"):
        continuous_sparsification(S.path("nope")).init(params, None)
    with pytest.raises(ValueError, match="regex"):
        S.path("(")
    with pytest.raises(ValueError, match="selector"):
        map_selected(params, "kernel", lambda p, x: x)
    with pytest.raises(TypeError, match="other must be a pae.select.Selector"):
        S.kernels() & (lambda p, x: True)
    with pytest.raises(ValueError, match="any_of needs at least one selector"):
        S.any_of()
    with pytest.raises(ValueError, match="ndim needs min <= max, got min=3, max=1"):
        S.ndim(min=3, max=1)


def test_label_roles_and_role_optimizer():
    params = _linen_params()["params"]
    latent = continuous_sparsification(S.conv_kernels((3, 3))).init(params, None)
    roles = label_roles(latent)
    node = roles["BasicBlock_0"]["Conv_0"]["kernel"]
    assert isinstance(node, SoftMask) and (node.weight, node.logits) == ("weights", "mask")
    assert node.s_init == "frozen"   # the search's s_init travels in the node, never trained
    assert roles["BasicBlock_0"]["shortcut"]["kernel"] == "weights"
    assert roles["Dense_0"]["bias"] == "weights"
    assert sorted(set(jax.tree.leaves(roles))) == ["frozen", "mask", "weights"]
    # weight decay reaches the weights only; masks get their own optimizer
    tx = role_optimizer({"weights": optax.chain(optax.add_decayed_weights(0.5), optax.sgd(1.0)),
                         "mask": optax.sgd(1.0)})
    state = tx.init(latent)
    zeros = jax.tree.map(jnp.zeros_like, latent)
    updates, _ = jax.jit(tx.update)(zeros, state, latent)
    u = updates["BasicBlock_0"]["Conv_0"]["kernel"]
    w = latent["BasicBlock_0"]["Conv_0"]["kernel"]
    np.testing.assert_allclose(u.weight, -0.5 * w.weight, rtol=1e-6)
    np.testing.assert_array_equal(u.logits, 0.0)
    np.testing.assert_array_equal(u.s_init, 0.0)   # frozen: set_to_zero
    with pytest.raises(ValueError, match=r"no optimizer for role\(s\) \['mask'\]"):
        role_optimizer({"weights": optax.sgd(1.0)}).init(latent)


@latent_node({"weight": "weights", "gain": "gain"})
class Gain:
    weight: jax.Array
    gain: jax.Array


def gain_transform(select):
    """A toy transform: weight * gain, penalty sum(gain**2)."""
    return Transform(
        init=lambda p, k: map_selected(p, select, lambda path, w: Gain(w, jnp.full((), 3.0))),
        apply=lambda lat, ctx: map_nodes(lambda n: n.weight * n.gain, lat, Gain),
        penalty=lambda lat, ctx: sum(jnp.sum(n.gain ** 2) for n in pae.core.nodes(lat, Gain)),
        finalize=lambda lat, ctx: map_nodes(lambda n: n.weight * jnp.round(n.gain), lat, Gain))


def test_chain_order_semantics():
    params = _linen_params()["params"]
    cs = continuous_sparsification(S.conv_kernels((3, 3)), s_init=0.3, lmbda=0.01)
    gain = gain_transform(S.kernels())  # acts on CS's latent: finds the weight *inside* SoftMask
    both = chain(cs, gain)
    latent = both.init(params, jax.random.PRNGKey(0))
    node = latent["BasicBlock_0"]["Conv_0"]["kernel"]
    assert isinstance(node, SoftMask) and isinstance(node.weight, Gain)  # logits stay unwrapped
    assert isinstance(latent["Dense_0"]["kernel"], Gain)
    ctx = Context.make(beta=2.0)
    out = jax.jit(both.apply)(latent, ctx)
    ref = cs.apply(gain.apply(latent, ctx), ctx)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, ref)
    w = params["BasicBlock_0"]["Conv_0"]["kernel"]
    m = 1 / (1 + np.exp(-2.0 * 0.3)) / (1 / (1 + np.exp(-0.3)))
    np.testing.assert_allclose(out["BasicBlock_0"]["Conv_0"]["kernel"], 3.0 * w * m, rtol=1e-5)
    pen = both.penalty(latent, ctx)
    ref_pen = gain.penalty(latent, ctx) + cs.penalty(gain.apply(latent, ctx), ctx)
    np.testing.assert_allclose(pen, ref_pen, rtol=1e-6)
    np.testing.assert_allclose(pen, 4 * 9.0 + 0.01 * m * (3 * 3 * 3 * 8 + 3 * 3 * 8 * 8), rtol=1e-5)
    fin = both.finalize(latent, ctx)
    np.testing.assert_allclose(fin["BasicBlock_0"]["Conv_1"]["kernel"],
                               3.0 * params["BasicBlock_0"]["Conv_1"]["kernel"]
                               * (1 / (1 / (1 + np.exp(-0.3)))), rtol=1e-5)
    assert jax.tree.structure(identity().apply(params, ctx)) == jax.tree.structure(params)
    assert chain().init(params, None) is params
    with pytest.raises(ValueError, match="chain argument 1"):
        chain(cs, lambda x: x)


def test_context_is_traced_data_and_validates():
    ctx = Context.make(beta=3.0, key=1, step=5)
    f = jax.jit(lambda c: c.beta * 2)
    assert float(f(ctx)) == 6.0 and float(f(ctx.replace(beta=jnp.float32(4.0)))) == 8.0
    assert f._cache_size() == 1  # a new beta never recompiles
    assert not np.array_equal(ctx.fold(0).key, ctx.fold(1).key)
    # an int, a typed key, a raw key and a traced int seed give the same raw key
    want = np.asarray(jax.random.PRNGKey(7))
    for key in (7, np.int64(7), jax.random.key(7), jax.random.PRNGKey(7)):
        np.testing.assert_array_equal(Context.make(key=key).key, want)
    np.testing.assert_array_equal(jax.jit(lambda k: Context.make(key=k).key)(7), want)
    np.testing.assert_array_equal(jax.jit(lambda k: Context.make(key=k).key)(jax.random.key(7)), want)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be finite and > 0"):
            Context.make(beta=bad)


def test_linen_and_nnx_give_the_same_masked_model():
    class Lin(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(5, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.out = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.bn(self.linear(x))))

    model = Lin(nnx.Rngs(0))
    model.eval()
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    assert S.leaf_paths(params) == ["bn/bias", "bn/scale", "linear/bias", "linear/kernel",
                                    "out/bias", "out/kernel"]
    cs = continuous_sparsification(S.kernels(), s_init=-0.2)
    latent = cs.init(params, None)
    assert pae.core.label_roles(latent)["linear"]["kernel"].get_value().logits == "mask"
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
    ctx = Context.make(beta=1.5)

    @jax.jit
    def forward(latent, ctx):
        return nnx.merge(graph, cs.apply(latent, ctx), rest)(x)

    # the same computation by hand
    scale = 1 / (1 + np.exp(-1.5 * -0.2)) / (1 / (1 + np.exp(0.2)))
    kin, kout = params["linear"]["kernel"][...], params["out"]["kernel"][...]
    h = x @ (kin * scale) + params["linear"]["bias"][...]
    h = nnx.merge(graph, params, rest).bn(h)
    ref = jax.nn.relu(h) @ (kout * scale) + params["out"]["bias"][...]
    np.testing.assert_allclose(forward(latent, ctx), ref, rtol=1e-5, atol=1e-6)
    # and the Linen path: kernels of a Dense net get the same mask
    dense = nn.Dense(4)
    lp = dense.init(jax.random.PRNGKey(0), x)["params"]
    out = cs.apply(cs.init(lp, None), ctx)
    np.testing.assert_allclose(out["kernel"], lp["kernel"] * scale, rtol=1e-6)
    np.testing.assert_array_equal(out["bias"], lp["bias"])


def test_check_min_int_takes_integral_numbers_at_or_above_the_bound():
    import numpy as np
    import pytest
    from pae.core import check_min_int
    assert check_min_int("n", np.int64(3), 3) == 3 and type(check_min_int("n", np.int8(4), 0)) is int
    for bad in (2, 2.9, 3.0, "3", True, None):
        with pytest.raises(ValueError, match=f"n must be an int >= 3, got {bad!r}"):
            check_min_int("n", bad, 3)
