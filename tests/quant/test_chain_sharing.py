"""Quantization after soft sharing (``pae.chain(quantization, pae.sharing.templates(...))``): the
widths and the quantizer act on the combined kernels ``sum_j alpha_ij T_j``; export packs those and
equals the phase-2 model; the chain trains on the engine."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pae
from pae import quant as q
from pae.quant.export import dequantize_layer


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(8)(x))
        x = nn.relu(nn.Dense(8)(x))
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


GROUPS = {"g": pae.core.select.path(r"Dense_[12]/kernel$")}


def test_export_after_sharing_packs_the_combined_kernels():
    model, x = MLP(), jax.random.normal(jax.random.PRNGKey(0), (6, 5))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    sharing = pae.sharing.templates(GROUPS, 2)
    latent = pae.chain(q.noise_injection(), sharing).init(params, jax.random.PRNGKey(1))
    assert isinstance(latent, pae.sharing.SharedParams)
    node = latent.params["Dense_1"]["kernel"]
    assert isinstance(node, q.NoisyWeight) and isinstance(node.weight, pae.sharing.SharedKernel)
    key = jax.random.PRNGKey(2)

    def widths(n):
        nonlocal key
        key, sub = jax.random.split(key)
        return n.replace(logits=jax.random.normal(sub, n.logits.shape) * 3.0)

    latent = pae.core.map_nodes(widths, latent, q.NoisyWeight)
    latent = q.assign_palette(jax.device_get(latent), count_overhead=False)
    ctx = pae.Context.make(key=0)
    fine = pae.chain(q.palette_quantizer(), sharing)
    ref = model.apply({"params": fine.apply(latent, ctx)}, x)
    ex = q.export(model, latent)
    np.testing.assert_allclose(ex.apply(ex.tree, x), ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    bank = np.asarray(latent.banks["g"], np.float64)
    for name in ("Dense_1", "Dense_2"):
        n = latent.params[name]["kernel"]
        w = np.einsum("k,kij->ij", np.asarray(n.weight.coefficients, np.float64), bank)   # sum_j alpha_j T_j
        b = np.asarray(n.bits, np.float64)[:, None]
        r = np.abs(w).max(axis=0)
        o = (2.0 ** b - 1) / 2
        d = r / o
        want = (np.clip(np.round(w / d + o), 0, 2 * o) - o) * d
        np.testing.assert_allclose(np.asarray(dequantize_layer(ex.tree["layers"][f"{name}/kernel"])), want,
                                   rtol=1e-5, atol=1e-6)
    assert len(ex.tree["layers"]["Dense_1/kernel"].bits) == 2                  # both segments non-empty


def test_chain_after_sharing_trains_on_the_engine():
    from pae.train import init_state, make_task, train_phases
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 5)) * 2.0

    def split(n):
        y = rng.integers(0, 3, n)
        return (means[y] + rng.normal(size=(n, 5))).astype(np.float32), y.astype(np.int32)

    task = make_task(MLP(), {"train": split(256), "test": split(64)})
    cfg = q.QuantConfig(noise_epochs=3, finetune_epochs=1, lr=1e-2, bits_lr=0.05, target_bits=3.0)
    sharing = pae.sharing.templates(GROUPS, 2)
    plain = init_state(task.model, task.example, 0)
    state = plain.replace(params=pae.chain(q.noise_transform(cfg), sharing).init(
        jax.device_get(plain.params), jax.random.PRNGKey(0)))
    res = train_phases(task, q.quant_phases(cfg, model=task.model, inner=sharing), state, batch_size=64)
    noise = res.rows("noise")
    assert noise[-1]["train_loss"] < noise[0]["train_loss"]
    assert noise[-1]["weight_bits"] < noise[0]["weight_bits"]                 # the budget pulls widths down
    latent = jax.device_get(res.state.params)
    assert isinstance(latent, pae.sharing.SharedParams)
    ex = q.export(task.model, latent)
    xt = jnp.asarray(split(16)[0])
    ref = task.model.apply({"params": pae.chain(q.palette_quantizer(), sharing).apply(
        latent, pae.Context.make(key=0))}, xt)
    np.testing.assert_allclose(ex.apply(ex.tree, xt), ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_activations_after_sharing_get_running_statistics_and_train_on_the_engine():
    """The activation nodes inside a sharing latent (or a FrozenDict) are found: each layer gets its
    running statistics, and both phases train (the first step used to fail: no statistics)."""
    import flax

    from pae.quant import activations as qa
    from pae.train import init_state, make_task, train_phases

    rng = np.random.default_rng(0)
    data = {"train": (rng.normal(size=(64, 5)).astype(np.float32), rng.integers(0, 3, 64).astype(np.int32)),
            "test": (rng.normal(size=(32, 5)).astype(np.float32), rng.integers(0, 3, 32).astype(np.int32))}
    task = make_task(MLP(), data)
    cfg = q.QuantConfig(noise_epochs=1, finetune_epochs=1, activations=True)
    sharing = pae.sharing.templates(GROUPS, 2)
    plain = init_state(task.model, task.example, 0)
    latent = pae.chain(q.noise_transform(cfg), sharing).init(jax.device_get(plain.params), jax.random.PRNGKey(0))
    want = {"Dense_0": 5, "Dense_1": 8, "Dense_2": 8, "Dense_3": 8}
    assert qa.act_paths(latent) == qa.act_paths(flax.core.freeze(latent.params)) == want
    assert set(q.with_act_stats({}, latent)) == set(want)
    result = train_phases(task, q.quant_phases(cfg, model=task.model, inner=sharing), plain.replace(params=latent),
                          batch_size=32, precompile=False)
    assert [r["phase"] for r in result.history] == ["noise", "finetune"]
    assert all(np.isfinite(r["train_loss"]) and r["act_bits"] > 1 for r in result.history)
