"""Structured continuous sparsification (pae.growth.structured/flops/extraction) against NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pae.core import Context, select
from pae.growth import extraction as pe, flops as pf, structured as ps
from pae.models import MLP, VGG, CifarResNet
from pae.models.slim import SlimResNet, SlimVGG
from pae.models.vgg import CONFIGS as VGG_CONFIGS
from pae.train import init_state

EPS = 1e-5


def perturbed(model, x, seed=0, init_latent=None):
    """init_state with random BN affine parameters and statistics (nothing trivially 0 or 1)."""
    state = init_state(model, x, seed)
    rng = np.random.default_rng(seed + 7)

    def perturb(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if name in ("bias", "mean"):
            return rng.normal(0, 0.5, leaf.shape).astype(np.float32)
        return np.asarray(leaf)

    params = jax.tree_util.tree_map_with_path(perturb, state.params)
    stats = jax.tree_util.tree_map_with_path(perturb, state.batch_stats)
    if init_latent is not None:
        params = init_latent(params, None)
    return state.replace(params=params, batch_stats=stats)


def random_logits(spec, rng, p_on=0.5):
    """Random logits (away from 0) of every group and block."""
    ch = {g: np.where(rng.uniform(size=n) < p_on, 1, -1) * rng.uniform(0.2, 2.0, n)
          for g, n in spec.groups}
    bl = {b.name: np.float32(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 2.0)) for b in spec.blocks}
    return {"channels": {g: v.astype(np.float32) for g, v in ch.items()},
            "blocks": {b: np.asarray(v, np.float32) for b, v in bl.items()}}


# ----------------------------------------------------------------------------- NumPy reference VGG

def np_conv3(x, kernel, bias):
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]), np.float64)
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nhwi,io->nhwo", xp[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
    return out + bias


def np_vgg(config, p, s, x, gates, train):
    """The gated VGG: channel c of conv i outputs m_c * BN(conv(x))_c (then ReLU, pools)."""
    x = x.astype(np.float64)
    i = 0
    for item in config:
        if item == "M":
            n, h, w, c = x.shape
            x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
            continue
        z = np_conv3(x, p[f"Conv_{i}"]["kernel"], p[f"Conv_{i}"]["bias"])
        bn = p[f"BatchNorm_{i}"]
        mean, var = (z.mean((0, 1, 2)), z.var((0, 1, 2))) if train else \
            (s[f"BatchNorm_{i}"]["mean"], s[f"BatchNorm_{i}"]["var"])
        y = (z - mean) / np.sqrt(var + EPS) * bn["scale"] + bn["bias"]
        x = np.maximum(gates[f"Conv_{i}"] * y, 0)
        i += 1
    return x.mean((1, 2)) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


@pytest.fixture(scope="module")
def vgg_setup():
    config = (3, "M", 5, 4)
    model = SlimVGG(config, 3)
    x = np.random.default_rng(1).normal(size=(6, 4, 4, 3)).astype(np.float32)
    spec = ps.gate_spec(model, x)
    state = perturbed(model, x)
    return config, model, x, spec, state


@pytest.fixture(scope="module")
def resnet_setup():
    model = CifarResNet(14, 5, (4, 6, 8))
    x = np.random.default_rng(2).normal(size=(5, 8, 8, 3)).astype(np.float32)
    spec = ps.gate_spec(model, x)
    return model, x, spec, perturbed(model, x, seed=3)


# ----------------------------------------------------------------------------- models

def test_slim_models_are_the_originals_at_full_width():
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    full = CifarResNet(14, 7, (4, 6, 8))
    v = perturbed(full, x)
    variables = {"params": v.params, "batch_stats": v.batch_stats}
    slim = SlimResNet.like(full)
    assert jax.tree.structure(slim.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(slim.apply(variables, x), full.apply(variables, x), rtol=1e-6, atol=1e-6)
    x32 = np.zeros((1, 32, 32, 3), np.float32)
    shapes = [jax.eval_shape(m.init, jax.random.PRNGKey(0), x32)
              for m in (VGG(16, 10), SlimVGG(VGG_CONFIGS[16], 10))]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
    assert jax.tree.leaves(shapes[0]) == jax.tree.leaves(shapes[1])


# ----------------------------------------------------------------------------- gate algebra

@pytest.mark.parametrize("train", [False, True])
def test_gate_algebra_matches_numpy_vgg(vgg_setup, train):
    config, model, x, spec, state = vgg_setup
    rng = np.random.default_rng(4)
    gates = {g: rng.uniform(0, 1.5, n).astype(np.float32) for g, n in spec.groups}
    gates["Conv_1"][1] = 0.0
    params = jax.jit(lambda p, g: ps.gate_params(spec, p, g, {}))(state.params, gates)
    variables = {"params": params, "batch_stats": state.batch_stats}
    out = model.apply(variables, x, train=True, mutable=["batch_stats"])[0] if train else \
        model.apply(variables, x)
    ref = np_vgg(config, jax.tree.map(np.asarray, state.params),
                 jax.tree.map(np.asarray, state.batch_stats), x, gates, train)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_gate_algebra_resnet_leaves(resnet_setup):
    """Stream gates hit the stem BN, every conv2's BN and the shortcut kernels' output columns; block
    gates multiply the branch's last BN; inner gates the block's first BN; nothing else changes."""
    model, x, spec, state = resnet_setup
    rng = np.random.default_rng(5)
    ch = {g: rng.uniform(0, 2, n).astype(np.float32) for g, n in spec.groups}
    bl = {b.name: np.float32(rng.uniform(0, 2)) for b in spec.blocks}
    out = ps.gate_params(spec, state.params, ch, bl)
    p = jax.tree.map(np.asarray, state.params)
    o = jax.tree.map(np.asarray, out)
    for leaf in ("scale", "bias"):
        np.testing.assert_allclose(o["BatchNorm_0"][leaf], p["BatchNorm_0"][leaf] * ch["stream0"], rtol=1e-6)
        # BasicBlock_1: stage 0, identity shortcut, gated block
        np.testing.assert_allclose(o["BasicBlock_1"]["BatchNorm_1"][leaf],
                                   p["BasicBlock_1"]["BatchNorm_1"][leaf] * ch["stream0"] * bl["BasicBlock_1"],
                                   rtol=1e-6)
        np.testing.assert_allclose(o["BasicBlock_1"]["BatchNorm_0"][leaf],
                                   p["BasicBlock_1"]["BatchNorm_0"][leaf] * ch["BasicBlock_1/Conv_0"], rtol=1e-6)
        # BasicBlock_2: downsampling, ungated block
        np.testing.assert_allclose(o["BasicBlock_2"]["BatchNorm_1"][leaf],
                                   p["BasicBlock_2"]["BatchNorm_1"][leaf] * ch["stream1"], rtol=1e-6)
    np.testing.assert_allclose(o["BasicBlock_2"]["shortcut"]["kernel"],
                               p["BasicBlock_2"]["shortcut"]["kernel"] * ch["stream1"], rtol=1e-6)
    for path in ("Conv_0", "BasicBlock_1/Conv_0", "BasicBlock_2/Conv_1", "Dense_0"):
        a, b = o, p
        for k in path.split("/"):
            a, b = a[k], b[k]
        np.testing.assert_array_equal(a["kernel"], b["kernel"])
    assert {b.name for b in spec.blocks} == {"BasicBlock_0", "BasicBlock_1", "BasicBlock_3", "BasicBlock_5"}


def test_disabled_block_is_its_identity(resnet_setup):
    model, x, spec, state = resnet_setup
    ch = {g: np.ones(n, np.float32) for g, n in spec.groups}
    off = ps.gate_params(spec, state.params, ch, {"BasicBlock_3": np.float32(0)})
    gated = model.apply({"params": off, "batch_stats": state.batch_stats}, x)
    blocks = tuple(b for b in SlimResNet.like(model).blocks if b[0] != 3)
    slim = SlimResNet((4, 6, 8), blocks, 5)
    params = {k: v for k, v in state.params.items() if k != "BasicBlock_3"}
    stats = {k: v for k, v in state.batch_stats.items() if k != "BasicBlock_3"}
    np.testing.assert_allclose(gated, slim.apply({"params": params, "batch_stats": stats}, x),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sampling

def test_sampling_statistics_and_estimators(resnet_setup):
    model, x, spec, state = resnet_setup
    rng = np.random.default_rng(6)
    logits = random_logits(spec, rng)
    logits["channels"]["stream1"][:3] = [0.0, 3.0, -3.0]
    beta = 1.7
    n = 3000

    def draw(key):
        return ps.gates(spec, logits, Context.make(beta=beta, key=key, train=True))

    ch, bl = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.PRNGKey(0), n))
    for g, s in logits["channels"].items():
        q = np.asarray(ch[g])
        assert set(np.unique(q)) <= {0.0, 1.0}
        p = 1 / (1 + np.exp(-beta * s.astype(np.float64)))
        # binomial standard error, 5 sigma
        assert np.all(np.abs(q.mean(0) - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-3), g
    for b, s in logits["blocks"].items():
        p = 1 / (1 + np.exp(-beta * float(s)))
        assert abs(np.asarray(bl[b]).mean() - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-3
    # draws of different channels and steps are not all equal; the same key draws the same
    q1 = np.asarray(ch["stream1"])
    assert 0.1 < np.corrcoef(q1[:, 1], q1[:, 0])[0, 1] + 1 < 1.9
    a = draw(jax.random.PRNGKey(3))[0]["stream2"]
    np.testing.assert_array_equal(a, draw(jax.random.PRNGKey(3))[0]["stream2"])
    # evaluation: 1[s > 0], strict
    ev = ps.gates(spec, logits, Context.make(beta=beta, train=False))[0]["stream1"]
    np.testing.assert_array_equal(ev, (logits["channels"]["stream1"] > 0).astype(np.float32))
    assert ev[0] == 0.0


@pytest.mark.parametrize("estimator", ["straight_through", "scaled"])
def test_estimator_forward_and_gradient(resnet_setup, estimator):
    model, x, spec, state = resnet_setup
    rng = np.random.default_rng(7)
    logits = random_logits(spec, rng)
    w = {g: rng.normal(size=n).astype(np.float32) for g, n in spec.groups}
    beta = 2.3
    ctx = Context.make(beta=beta, key=11, train=True)

    def f(lg):
        ch, _ = ps.gates(spec, lg, ctx, estimator)
        return sum(jnp.sum(w[g] * ch[g]) for g in ch), ch

    grad, ch = jax.grad(f, has_aux=True)(logits)
    u = ps.uniforms(spec, ctx.key)[0]
    for g, s in logits["channels"].items():
        p = 1 / (1 + np.exp(-beta * s.astype(np.float64)))
        q = (np.asarray(u[g]) < p).astype(np.float64)
        dp = beta * p * (1 - p)
        if estimator == "straight_through":
            np.testing.assert_array_equal(ch[g], q)
            np.testing.assert_allclose(grad["channels"][g], w[g] * dp, rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_allclose(ch[g], q * p, rtol=1e-6)
            np.testing.assert_allclose(grad["channels"][g], w[g] * q * dp, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- FLOPs

def test_flops_vgg_hand_counts():
    model = SlimVGG((4, "M", 6), 2)
    x = np.zeros((1, 4, 4, 3), np.float32)
    spec = ps.gate_spec(model, x)
    # full: conv0 4*4 positions * 9 taps * 3 * 4 = 1728; pool -> 2x2; conv1 2*2*9*4*6 = 864; fc 6*2 = 12
    assert pf.full_cost(spec, "flops") == 2604
    # conv0 keeps 2 of 4, conv1 3 of 6: 16*9*3*2 = 864; 4*9*2*3 = 216; 3*2 = 6
    gates = {"Conv_0": np.array([1, 0, 1, 0], np.float32), "Conv_1": np.array([0, 1, 1, 0, 1, 0], np.float32)}
    assert float(pf.cost(spec, gates, {}, "flops")) == 1086
    # params: conv0 (27 + bias + 2 BN) * 4 = 120; conv1 (36 + 1 + 2) * 6 = 234; fc (6 + 1) * 2 = 14
    n_params = sum(np.size(v) for v in jax.tree.leaves(model.init(jax.random.PRNGKey(0), x)["params"]))
    assert pf.full_cost(spec, "params") == 368 == n_params
    # kept: conv0 (27+3)*2 = 60; conv1 (18+3)*3 = 63; fc (3+1)*2 = 8
    assert float(pf.cost(spec, gates, {}, "params")) == 131


def test_flops_resnet_hand_counts():
    model = CifarResNet(8, 10, (2, 4, 4))
    spec = ps.gate_spec(model, np.zeros((1, 4, 4, 3), np.float32))
    # stem 16*9*3*2 = 864; block0 (4x4, 2->2->2) 576 + 576; block1 (stride 2, 2x2) conv0 4*9*2*4 =
    # 288, conv1 4*9*4*4 = 576, shortcut 4*2*4 = 32; block2 (1x1) 9*4*4 = 144 twice, shortcut 16;
    # fc 4*10 = 40
    assert pf.full_cost(spec, "flops") == 864 + 1152 + 288 + 576 + 32 + 144 + 144 + 16 + 40
    ch = {"stream0": np.array([0, 1.0]), "stream1": np.array([1.0, 0, 1, 0]),
          "BasicBlock_1/Conv_0": np.array([1.0, 1, 0, 1])}
    # stem 16*9*3*1 = 432; block0 off; block1 conv0 4*9*1*3 = 108, conv1 4*9*3*2 = 216, shortcut
    # 4*1*2 = 8; block2 conv0 9*2*4 = 72, conv1 9*4*4 = 144, shortcut 2*4 = 8; fc 40
    assert float(pf.cost(spec, ch, {"BasicBlock_0": 0.0}, "flops")) == 432 + 108 + 216 + 8 + 72 + 144 + 8 + 40
    assert [b.name for b in spec.blocks] == ["BasicBlock_0"]


def test_expected_flops_is_the_mean_sampled_flops(resnet_setup):
    """C(sigmoid(beta s)) is the expectation of C(q): Monte Carlo over sampled nets agrees."""
    model, x, spec, state = resnet_setup
    logits = random_logits(spec, np.random.default_rng(8))
    beta = 0.8
    probs = ps.probabilities(logits, beta)
    expected = float(pf.cost(spec, *probs))

    def sampled(key):
        return pf.cost(spec, *ps.gates(spec, logits, Context.make(beta=beta, key=key, train=True)))

    costs = np.asarray(jax.jit(jax.vmap(sampled))(jax.random.split(jax.random.PRNGKey(1), 4000)))
    assert abs(costs.mean() - expected) < 4 * costs.std() / np.sqrt(len(costs))
    assert pf.training_flops(100.0, batch_size=8, steps=5) == 3 * 8 * 5 * 100.0


# ----------------------------------------------------------------------------- budget penalty

@pytest.mark.parametrize("utilization,penalize", [("flops", "cost"), ("params", "cost"), ("flops", "count")])
@pytest.mark.parametrize("on", [0.25, 1.0])
def test_budget_penalty_sign_and_size(vgg_setup, utilization, penalize, on):
    config, model, x, spec, state = vgg_setup
    budget, lmbda, beta = 0.5, 3.0, 1.5
    t = ps.structured_sparsification(spec, budget=budget, lmbda=lmbda, utilization=utilization,
                                     seed_width=on, penalize=penalize)
    latent = t.init(state.params, None)
    rng = np.random.default_rng(9)
    latent = latent.replace(logits={"channels": {g: s * rng.uniform(0.5, 2, s.shape).astype(np.float32)
                                                 for g, s in latent.logits["channels"].items()},
                                    "blocks": {}})
    ctx = Context.make(beta=beta)
    # NumPy reference: the costs of the SlimVGG((3, M, 5, 4)) on 4x4 inputs
    s = {g: np.asarray(v, np.float64) for g, v in latent.logits["channels"].items()}
    hard = {g: (v > 0).astype(np.float64) for g, v in s.items()}
    soft = {g: 1 / (1 + np.exp(-beta * v)) for g, v in s.items()}

    def c(gt):
        a0, a1, a2 = (gt[f"Conv_{i}"].sum() for i in range(3))
        if utilization == "flops":   # 4x4 conv0, then 2x2 for conv1, conv2; fc 4 -> 3
            return 16 * 9 * 3 * a0 + 4 * 9 * a0 * a1 + 4 * 9 * a1 * a2 + a2 * 3
        return (27 + 3) * a0 + (9 * a0 + 3) * a1 + (9 * a1 + 3) * a2 + (a2 + 1) * 3

    ones = {g: np.ones_like(v) for g, v in s.items()}
    u = c(hard) / c(ones)
    lam = lmbda * (u - budget)
    if penalize == "count":      # the unweighted L1 of the 3 + 5 + 4 indicators (CSQ's form), normalized
        c = lambda gt: sum(v.sum() for v in gt.values()) / 12  # noqa: E731
    pen, grad = jax.value_and_grad(t.penalty)(latent, ctx)
    np.testing.assert_allclose(float(pen), lam * c(soft) / c(ones), rtol=1e-5)
    assert (lam < 0) == (on == 0.25)
    # lambda_t carries no gradient: grad = lam * dR/ds
    eps = 1e-3
    g = "Conv_1"
    for j in range(2):
        hi = {k: v.copy() for k, v in s.items()}
        lo = {k: v.copy() for k, v in s.items()}
        hi[g][j] += eps
        lo[g][j] -= eps
        fd = lam * (c({k: 1 / (1 + np.exp(-beta * v)) for k, v in hi.items()}) -
                    c({k: 1 / (1 + np.exp(-beta * v)) for k, v in lo.items()})) / (2 * eps) / c(ones)
        np.testing.assert_allclose(float(grad.logits["channels"][g][j]), fd, rtol=1e-3)
    # below budget the penalty's gradient pushes every logit up (growth), above it down (pruning)
    signs = np.concatenate([np.sign(np.asarray(v)) for v in grad.logits["channels"].values()])
    assert np.all(signs == (1 if lam > 0 else -1))


def test_fit_budget_switches_off_the_weakest_channels(vgg_setup):
    config, model, x, spec, state = vgg_setup
    latent = ps.structured_sparsification(spec, seed_width=1.0).init(state.params, None)
    rng = np.random.default_rng(4)
    s = {g: rng.uniform(0.1, 3.0, v.shape).astype(np.float32) for g, v in latent.logits["channels"].items()}
    s["Conv_1"][1] = -1.0                                  # already off
    latent = latent.replace(logits={"channels": s, "blocks": {}})

    def flops(on):   # SlimVGG((3, M, 5, 4)) on 4x4 inputs, hand-counted (test_budget_penalty_sign_and_size)
        a0, a1, a2 = (on[f"Conv_{i}"].sum() for i in range(3))
        return 16 * 9 * 3 * a0 + 4 * 9 * a0 * a1 + 4 * 9 * a1 * a2 + a2 * 3

    full = flops({g: np.ones_like(v) for g, v in s.items()})
    # NumPy reference: the active logits in increasing order; switch off the fewest from the smallest
    order = sorted((float(v[i]), g, i) for g, v in s.items() for i in np.flatnonzero(v > 0))
    for budget in (0.3, 0.6):
        on = {g: (v > 0).astype(float) for g, v in s.items()}
        for _, g, i in order:
            if flops(on) / full <= budget:
                break
            if on[g].sum() > 1:                            # every group keeps a channel
                on[g][i] = 0.0
        out = ps.fit_budget(spec, latent, budget)
        got = {g: (np.asarray(v) > 0).astype(float) for g, v in out.logits["channels"].items()}
        for g in s:
            np.testing.assert_array_equal(got[g], on[g])
        assert flops(got) / full <= budget
        kept = {g: np.asarray(v)[got[g] > 0] for g, v in out.logits["channels"].items()}
        np.testing.assert_array_equal(np.concatenate(list(kept.values())),
                                      np.concatenate([s[g][on[g] > 0] for g in s]))
    assert ps.fit_budget(spec, latent, 1.0) is latent
    with pytest.raises(ValueError, match="budget"):
        ps.fit_budget(spec, latent, 0.0)



def _extracted_fraction(spec, latent, state, x):
    ex = pe.extract(spec, latent, state.batch_stats)
    return pf.full_cost(ps.gate_spec(ex.model, x[:1])) / pf.full_cost(spec)


def test_fit_budget_counts_placeholders_then_trims_blocks_and_settle_pins(resnet_setup):
    """With blocks and an on block's inner group entirely off (extraction keeps a zeroed channel
    for it), the net fit_budget leaves is within the budget as *extracted*; once every group is
    down to one channel it switches off the on block of smallest logit; below the smallest net it
    raises; settle pins every off indicator."""
    model, x, spec, state = resnet_setup
    t = ps.structured_sparsification(spec)
    logits = random_logits(spec, np.random.default_rng(7), p_on=0.8)
    logits["blocks"] = {b: np.float32(v) for b, v in zip(logits["blocks"], (1.5, 0.5, 2.0, 1.0))}
    logits["channels"]["BasicBlock_1/Conv_0"][:] = -1.0          # on block, no inner channel
    latent = t.init(state.params, None).replace(logits=logits)
    before = _extracted_fraction(spec, latent, state, x)
    counted = float(pf.cost(spec, *ps.hard_gates(logits)) / pf.full_cost(spec))
    assert counted < before                                  # the placeholder costs
    for budget in (counted, 0.9 * before, 0.5 * before):
        out = ps.fit_budget(spec, latent, budget)
        assert _extracted_fraction(spec, out, state, x) <= budget + 1e-9
    # one channel per group: the blocks go, the smallest logit first
    one = {g: np.where(np.arange(v.size) == np.argmax(v), 1.0, -1.0).astype(np.float32)
           for g, v in logits["channels"].items()}
    latent1 = latent.replace(logits={"channels": one, "blocks": logits["blocks"]})
    used1 = _extracted_fraction(spec, latent1, state, x)
    out = ps.fit_budget(spec, latent1, used1 - 1e-6)
    assert {b: float(v > 0) for b, v in out.logits["blocks"].items()} == {
        "BasicBlock_0": 1.0, "BasicBlock_1": 0.0, "BasicBlock_3": 1.0, "BasicBlock_5": 1.0}
    for g, v in out.logits["channels"].items():
        np.testing.assert_array_equal(v, one[g])
    with pytest.raises(ValueError, match="below the smallest net"):
        ps.fit_budget(spec, latent1, 1e-4)
    pinned = ps.settle(spec, latent, 0.5 * before)
    fitted = ps.fit_budget(spec, latent, 0.5 * before)
    for a, b in zip(jax.tree.leaves(pinned.logits), jax.tree.leaves(fitted.logits)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(a, np.where(b > 0, b, ps.PINNED_OFF))


# ----------------------------------------------------------------------------- seed

def test_seed_architecture(resnet_setup):
    model, x, spec, state = resnet_setup
    t = ps.structured_sparsification(spec, seed_width=0.25, seed_blocks=1)
    latent = t.init(state.params, None)
    for g, n in spec.groups:
        on = np.asarray(latent.logits["channels"][g]) > 0
        assert on.sum() == max(1, int(np.ceil(0.25 * n))) and on[:on.sum()].all(), g
    # one block per stage: stage 0's first gated block; stages 1, 2 only their downsampling block
    assert {b: bool(v > 0) for b, v in latent.logits["blocks"].items()} == {
        "BasicBlock_0": True, "BasicBlock_1": False, "BasicBlock_3": False, "BasicBlock_5": False}
    full = ps.structured_sparsification(spec, seed_width=1.0, seed_blocks=None).init(state.params, None)
    assert all(np.all(np.asarray(v) > 0) for v in jax.tree.leaves(full.logits))


# ----------------------------------------------------------------------------- extraction

def _check_extraction(model, x, spec, state, logits):
    t = ps.structured_sparsification(spec)
    latent = t.init(state.params, None).replace(logits=jax.tree.map(jnp.asarray, logits))
    gated = model.apply({"params": t.apply(latent, Context.make(train=False)),
                         "batch_stats": state.batch_stats}, x)
    np.testing.assert_array_equal(gated, model.apply(
        {"params": t.finalize(latent, None), "batch_stats": state.batch_stats}, x))
    ex = pe.extract(spec, latent, state.batch_stats)
    np.testing.assert_allclose(ex.model.apply(ex.variables, x), gated, rtol=2e-5, atol=2e-5)
    return latent, ex


def test_extraction_resnet_equals_gated(resnet_setup):
    model, x, spec, state = resnet_setup
    for seed in range(3):
        logits = random_logits(spec, np.random.default_rng(10 + seed))
        logits["blocks"]["BasicBlock_3"] = np.float32(-1)
        logits["blocks"]["BasicBlock_1"] = np.float32(1)
        logits["channels"]["BasicBlock_1/Conv_0"][:] = -1    # an active block with no inner channel
        latent, ex = _check_extraction(model, x, spec, state, logits)
        names = [b[0] for b in ex.model.blocks]
        assert 3 not in names and 1 in names and "BasicBlock_3" not in ex.variables["params"]
        for s in range(3):
            assert ex.model.streams[s] == max(1, int((logits["channels"][f"stream{s}"] > 0).sum()))
    # the extracted parameters are the counted ones when no group is empty
    logits = random_logits(spec, np.random.default_rng(20), p_on=0.7)
    for g in logits["channels"]:
        logits["channels"][g][0] = 1.0
    latent, ex = _check_extraction(model, x, spec, state, logits)
    n = sum(np.size(v) for v in jax.tree.leaves(ex.variables["params"]))
    assert n == float(pf.cost(spec, *ps.hard_gates(latent.logits), "params"))


def test_extraction_vgg_equals_gated(vgg_setup):
    config, model, x, spec, state = vgg_setup
    logits = random_logits(spec, np.random.default_rng(11))
    logits["channels"]["Conv_2"][:] = -1.0     # a whole layer off: one zeroed channel stays
    latent, ex = _check_extraction(model, x, spec, state, logits)
    assert ex.model.config[0] == int((logits["channels"]["Conv_0"] > 0).sum()) and ex.model.config[-1] == 1
    assert ex.kept["Conv_2"].size == 0


def test_extraction_rejects_inconsistent_residual_sets(resnet_setup):
    model, x, spec, state = resnet_setup
    masks = {"BasicBlock_2/Conv_1": np.array([1, 1, 0, 1, 1, 1], bool),
             "BasicBlock_2/shortcut": np.array([1, 1, 1, 1, 1, 0], bool)}
    with pytest.raises(ValueError, match=r"inconsistent residual channel sets in group 'stream1'.*"
                                         r"BasicBlock_2/Conv_1.*BasicBlock_2/shortcut"):
        pe.extract_masked(spec, state.params, state.batch_stats, masks)
    # a disabled block's conv2 does not take part; consistent sets extract
    masks = {"BasicBlock_3/Conv_1": np.array([1, 0, 0, 1, 1, 1], bool)}
    ex = pe.extract_masked(spec, state.params, state.batch_stats, masks, {"BasicBlock_3": False})
    assert ex.model.streams == (4, 6, 8)


# ----------------------------------------------------------------------------- bad input

def test_bad_input(vgg_setup, resnet_setup):
    config, model, x, spec, state = vgg_setup
    for budget in (0.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            ps.structured_sparsification(spec, budget=budget)
    with pytest.raises(ValueError, match="budget"):
        ps.StructuredConfig(budget=0)
    with pytest.raises(ValueError, match="no gateable layer selected"):
        ps.structured_sparsification(spec, channels=select.path("nothing_like_this"))
    rspec = resnet_setup[2]
    with pytest.raises(ValueError, match="no gateable layer selected"):
        ps.structured_sparsification(rspec, channels=select.path("nothing"), blocks=False)
    ps.structured_sparsification(rspec, channels=select.path("nothing"), blocks=True)   # blocks only
    with pytest.raises(ValueError, match="supported models"):
        ps.gate_spec(MLP((8,), 3), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="estimator"):
        ps.structured_sparsification(spec, estimator="reinforce")
    with pytest.raises(ValueError, match="utilization"):
        ps.structured_sparsification(spec, utilization="latency")
    with pytest.raises(ValueError, match="penalize must be one of"):
        ps.structured_sparsification(spec, penalize="flops")
    with pytest.raises(ValueError, match="penalize must be one of"):
        ps.StructuredConfig(penalize="l2")
    with pytest.raises(ValueError, match="s_on > 0 > s_off"):
        ps.structured_sparsification(spec, s_off=0.5)
    with pytest.raises(TypeError, match="GateSpec"):
        ps.structured_sparsification(model)
    with pytest.raises(ValueError, match="unknown layer"):
        pe.extract_masked(spec, state.params, state.batch_stats, {"Conv_9": np.ones(3, bool)})
    with pytest.raises(ValueError, match=r"'Dense_0'.*never gated"):     # not silently ignored
        pe.extract_masked(spec, state.params, state.batch_stats, {"Dense_0": np.array([1, 0, 1], bool)})


def test_channel_selector_sees_the_real_kernel_shapes(vgg_setup, resnet_setup):
    """Shape-based selectors (conv_kernels, ndim) see each layer's kernel shape, not a 2-D stand-in."""
    model, x, spec, state = resnet_setup
    latent = lambda t: t.init(state.params, None)  # noqa: E731
    everyone = {g for g, _ in spec.groups}
    assert set(latent(ps.structured_sparsification(spec, channels=select.conv_kernels())).logits[
        "channels"]) == everyone
    # the 1x1 shortcuts write streams 1 and 2 only
    one_by_one = ps.structured_sparsification(spec, channels=select.conv_kernels((1, 1)), blocks=False)
    assert set(latent(one_by_one).logits["channels"]) == {"stream1", "stream2"}
    vspec, vstate = vgg_setup[3], vgg_setup[4]
    t = ps.structured_sparsification(vspec, channels=select.ndim(4))
    assert set(t.init(vstate.params, None).logits["channels"]) == {g for g, _ in vspec.groups}


def test_structured_phases_rejects_bad_compaction_widths_when_built(resnet_setup):
    """Bad compaction widths fail when the phases are built, not after the first segment trained."""
    spec = resnet_setup[2]
    cfg = ps.StructuredConfig(epochs=4)
    for widths, match in (({"stream9": 2}, "not a gated channel group"),
                          ({"stream0": 40}, r"int in \[1, 4\]"), ({"stream0": 2.5}, r"int in \[1, 4\]")):
        with pytest.raises(ValueError, match=match):
            ps.structured_phases(cfg, spec, compactions=[(2, widths)])
    with pytest.raises(ValueError, match="not a gated channel group"):    # stream0 not selected
        ps.structured_phases(cfg, spec, channels=select.path("BasicBlock_1/Conv_0"),
                             compactions=[(2, {"stream0": 2})])
    # a second compaction cannot widen the first one's net
    with pytest.raises(ValueError, match=r"int in \[1, 3\]"):
        ps.structured_phases(cfg, spec, compactions=[(1, {"stream0": 3}), (2, {"stream0": 4})])
    assert len(ps.structured_phases(cfg, spec, compactions=[(1, {"stream0": 3}), (2, {"stream0": 2})])) == 3


# ----------------------------------------------------------------------------- state surgery

def _state_with_momentum(spec, state, seed):
    """A TrainState whose params are a Gated latent with random logits and whose optimizer state
    (the search's role optimizer) has random momentum in every Gated-shaped moment."""
    rng = np.random.default_rng(seed)
    t = ps.structured_sparsification(spec)
    latent = t.init(state.params, None).replace(logits=random_logits(spec, rng))
    tx = ps.structured_optimizer(ps.StructuredConfig(epochs=4), 3)
    opt = tx.init(latent)
    opt = jax.tree.map(lambda a: rng.normal(size=np.shape(a)).astype(np.float32) if np.ndim(a) else
                       np.asarray(7, np.asarray(a).dtype), opt)
    return state.replace(params=latent, opt_state=opt)


def _leaf(tree, path):
    """The leaf at ``path`` (None for an optax MaskedNode: a moment of another role)."""
    for k in path.split("/"):
        tree = tree[k]
    return None if isinstance(tree, optax.MaskedNode) else np.asarray(tree)


def test_compact_state_slices_latent_stats_and_momentum(resnet_setup):
    model, x, spec, state = resnet_setup
    st = _state_with_momentum(spec, state, 30)
    widths = {"stream0": 2, "stream1": 4, "BasicBlock_1/Conv_0": 3, "BasicBlock_2/Conv_0": 6}
    slim, small = pe.compact_state(spec, st, widths)
    s = {g: np.asarray(v) for g, v in st.params.logits["channels"].items()}
    kept = {g: np.sort(np.argsort(-s[g], kind="stable")[:widths[g]]) if g in widths else np.arange(len(s[g]))
            for g in s}
    moments = [n for n in jax.tree.leaves(st.opt_state, is_leaf=lambda z: isinstance(z, ps.Gated))
               if isinstance(n, ps.Gated)]
    small_moments = [n for n in jax.tree.leaves(small.opt_state, is_leaf=lambda z: isinstance(z, ps.Gated))
                     if isinstance(n, ps.Gated)]
    assert len(moments) == len(small_moments) == 2          # the weights' and the logits' traces
    for layer in spec.layers:
        for full_tree, small_tree in [(st.params.weights, small.params.weights)] + [
                (a.weights, b.weights) for a, b in zip(moments, small_moments)]:
            ref = _leaf(full_tree, layer.path + "/kernel")
            if ref is None:
                assert _leaf(small_tree, layer.path + "/kernel") is None
                continue
            if layer.in_group:
                ref = np.take(ref, kept[layer.in_group], axis=-2)
            if layer.out_group:
                ref = np.take(ref, kept[layer.out_group], axis=-1)
            np.testing.assert_array_equal(_leaf(small_tree, layer.path + "/kernel"), ref)
        if layer.norm:
            for leaf in ("mean", "var"):
                np.testing.assert_array_equal(_leaf(small.batch_stats, f"{layer.norm}/{leaf}"),
                                              _leaf(st.batch_stats, f"{layer.norm}/{leaf}")[kept[layer.out_group]])
    # the logits' momentum is sliced as the logits are; the step counts are carried
    is_logit_moment = lambda m: not isinstance(m.logits["channels"]["stream1"], optax.MaskedNode)  # noqa: E731
    logit_moment = next(m for m in small_moments if is_logit_moment(m))
    full_moment = next(m for m in moments if is_logit_moment(m))
    for g in s:
        np.testing.assert_array_equal(logit_moment.logits["channels"][g],
                                      np.asarray(full_moment.logits["channels"][g])[kept[g]])
        np.testing.assert_array_equal(small.params.ids[g], kept[g].astype(np.float32))
    counts = [a for a in jax.tree.leaves(small.opt_state) if np.ndim(a) == 0]
    assert counts and all(int(c) == 7 for c in counts)
    # the compacted optimizer state is what the optimizer makes for the compacted latent
    tx = ps.structured_optimizer(ps.StructuredConfig(epochs=4), 3)
    want = jax.eval_shape(tx.init, small.params)
    assert jax.tree.structure(want) == jax.tree.structure(small.opt_state)
    assert [a.shape for a in jax.tree.leaves(want)] == [np.shape(a) for a in jax.tree.leaves(small.opt_state)]
    assert slim.streams == (2, 4, 8)
    # without carry_optimizer the optimizer restarts
    assert pe.compact_state(spec, st, widths, carry_optimizer=False)[1].opt_state is None


def test_expand_then_restructure_regrows(resnet_setup):
    """expand_state writes a compacted state back at its ids (dropped channels keep their values);
    restructure to wider widths brings dropped channels back with those values; a compaction that
    keeps every active channel leaves the evaluation logits unchanged."""
    model, x, spec, state = resnet_setup
    st = _state_with_momentum(spec, state, 31)
    for g in st.params.logits["channels"]:                  # every group keeps an active channel
        st.params.logits["channels"][g][0] = 1.5
    active = {g: int((np.asarray(v) > 0).sum()) for g, v in st.params.logits["channels"].items()}
    _, small = pe.compact_state(spec, st, active)
    back = pe.expand_state(spec, st, small)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(st)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # change the compacted state; expanding writes the change at the ids only
    bumped = small.replace(params=jax.tree.map(lambda a: np.asarray(a) + 1.0 if np.ndim(a) else a,
                                               small.params).replace(ids=small.params.ids))
    back = pe.expand_state(spec, st, bumped)
    k_full = _leaf(st.params.weights, "BasicBlock_2/Conv_1/kernel")
    k_back = _leaf(back.params.weights, "BasicBlock_2/Conv_1/kernel")
    ii, oo = (np.asarray(small.params.ids[g]).astype(int) for g in ("BasicBlock_2/Conv_0", "stream1"))
    inside = np.zeros(k_full.shape[-2:], bool)
    inside[np.ix_(ii, oo)] = True
    np.testing.assert_allclose(k_back[..., inside], k_full[..., inside] + 1.0, rtol=1e-6)
    np.testing.assert_array_equal(k_back[..., ~inside], k_full[..., ~inside])
    # the evaluation logits of the compacted net equal the full net's (all active channels kept)
    t = ps.structured_sparsification(spec)
    ctx = Context.make(train=False)
    ref = model.apply({"params": t.apply(st.params, ctx), "batch_stats": st.batch_stats}, x)
    slim, small = pe.compact_state(spec, st, active)
    sspec = ps.gate_spec(slim, x)
    ts = ps.structured_sparsification(sspec, reference=spec)
    out = slim.apply({"params": ts.apply(small.params, ctx), "batch_stats": small.batch_stats}, x)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    # regrowth: restructure the compacted net to wider widths: dropped channels come back
    wider = {g: min(n, active[g] + 2) for g, n in spec.groups}
    slim2, small2, full2 = pe.restructure(spec, st, small, wider)
    assert all(len(small2.params.ids[g]) == wider[g] for g in wider)
    for g in wider:
        assert set(np.asarray(small.params.ids[g]).tolist()) <= set(np.asarray(small2.params.ids[g]).tolist())
    k2 = _leaf(small2.params.weights, "BasicBlock_2/Conv_1/kernel")
    ii2, oo2 = (np.asarray(small2.params.ids[g]).astype(int) for g in ("BasicBlock_2/Conv_0", "stream1"))
    np.testing.assert_array_equal(k2, k_full[..., ii2[:, None], oo2[None, :]])
    assert slim2.streams == tuple(wider[f"stream{s}"] for s in range(3))
    with pytest.raises(ValueError, match="widths"):
        pe.compact_state(spec, st, {"stream0": 0})


def test_margin_widths(resnet_setup):
    model, x, spec, state = resnet_setup
    latent = ps.structured_sparsification(spec).init(state.params, None)
    w = ps.margin_widths(spec, latent, 0.25)
    for g, n in spec.groups:
        on = int((np.asarray(latent.logits["channels"][g]) > 0).sum())
        assert w[g] == min(n, on + int(np.ceil(0.25 * n)))
    assert all(v % 4 == 0 or v == dict(spec.groups)[g] for g, v in ps.margin_widths(spec, latent, 0.1, 4).items())
    with pytest.raises(ValueError, match="margin"):
        ps.margin_widths(spec, latent, 1.5)


def test_margin_widths_multiple_must_be_an_int_at_least_one(resnet_setup):
    """multiple=0 divided by zero, -2 gave negative widths, 2.5 fractional ones, True counted as 1."""
    model, x, spec, state = resnet_setup
    latent = ps.structured_sparsification(spec).init(state.params, None)
    assert ps.margin_widths(spec, latent, 0.25, np.int64(2)) == ps.margin_widths(spec, latent, 0.25, 2)
    for bad in (0, -2, 2.5, 2.0, True, "2"):
        with pytest.raises(ValueError, match="multiple must be an int >= 1"):
            ps.margin_widths(spec, latent, 0.25, multiple=bad)


def test_structured_metrics_checks_its_arguments_as_the_transform_does(vgg_setup):
    """A utilization typo silently reported lambda on the parameter count; budget/lmbda unchecked."""
    config, model, x, spec, state = vgg_setup
    for bad in ("FLOPs", "flop", None):
        with pytest.raises(ValueError, match="utilization must be one of"):
            ps.structured_metrics(spec, 0.5, 1.0, bad)
    for budget in (7.0, 0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="budget must be"):
            ps.structured_metrics(spec, budget=budget)
    for lmbda in (-3.0, float("inf")):
        with pytest.raises(ValueError, match="lmbda"):
            ps.structured_metrics(spec, lmbda=lmbda)
    with pytest.raises(TypeError, match="spec must be a GateSpec"):
        ps.structured_metrics(model)
    with pytest.raises(TypeError, match="reference must be a GateSpec"):
        ps.structured_metrics(spec, reference=model)
    # accepted values still give lambda_t = lmbda * (u - budget) with u the params fraction
    latent = ps.structured_sparsification(spec).init(state.params, None)
    row = ps.structured_metrics(spec, 0.25, 2.0, "params")(state.replace(params=latent), Context.make(beta=1.0))
    np.testing.assert_allclose(float(row["lambda"]), 2.0 * (float(row["params"]) - 0.25), rtol=1e-6)


def test_structured_config_needs_a_positive_beta_final_and_real_numbers():
    """beta_final=0 was accepted and failed only inside a phase's context; a str lr gave a NumPy
    error; bad seeds were accepted until the transform was built."""
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="beta_final must be finite and > 0"):
            ps.StructuredConfig(beta_final=beta)
    for name, bad in (("lr", "0.1"), ("mask_lr", "1"), ("momentum", None), ("beta_final", True),
                      ("budget", "0.5"), ("s_on", [1.0])):
        with pytest.raises(TypeError, match=f"StructuredConfig.{name} must be a real number"):
            ps.StructuredConfig(**{name: bad})
    with pytest.raises(TypeError, match="StructuredConfig.seed must be an int"):
        ps.StructuredConfig(seed=0.5)
    with pytest.raises(ValueError, match="seed_width must be in"):
        ps.StructuredConfig(seed_width=0.0)
    with pytest.raises(ValueError, match="s_on > 0 > s_off"):
        ps.StructuredConfig(s_on=-1.0)
    with pytest.raises(ValueError, match="seed_blocks must be an int >= 1"):
        ps.StructuredConfig(seed_blocks=0)
    assert ps.StructuredConfig(beta_final=1e-3, lr=np.float32(0.1), mask_lr=None).beta_final == 1e-3


def test_epochs_of_compactions_and_restructurings_are_never_truncated(resnet_setup):
    """2.9 became epoch 2, "2" epoch 2 and True epoch 1; now each is refused naming the argument."""
    model, x, spec, state = resnet_setup
    cfg = ps.StructuredConfig(epochs=4)
    for bad in (2.9, 2.0, "2", True):
        with pytest.raises(ValueError, match="compactions: an epoch must be an int >= 0"):
            ps.structured_phases(cfg, spec, compactions=[(bad, {"stream0": 3})])
        with pytest.raises(ValueError, match="restructure_at: an epoch must be an int >= 0"):
            ps.structured_search(None, cfg, spec, state, batch_size=4, restructure_at=[0, bad])
    phases = ps.structured_phases(cfg, spec, compactions=[(np.int64(2), {"stream0": 3})])
    assert [p.epochs for p in phases] == [2, 2]
