import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pae import models
from pae.train import (create_train_state, data_mesh, make_eval_step, make_train_step,
                       masked_cross_entropy, replicate, shard_batch)


def _np_cross_entropy(logits, targets, mask):
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    weights = np.broadcast_to(mask.reshape(mask.shape + (1,) * (nll.ndim - 1)), nll.shape)
    return (nll * weights).sum() / weights.sum(), ((logits.argmax(-1) == targets) * weights).sum()


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6)])
def test_masked_cross_entropy_matches_numpy(shape):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=shape).astype(np.float32) * 3
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    mask = (rng.random(shape[0]) < 0.7).astype(np.float32)
    mask[0] = 1
    loss, sums = jax.jit(masked_cross_entropy)(logits, targets, mask)
    ref_loss, ref_correct = _np_cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(sums["correct"], ref_correct)
    np.testing.assert_allclose(sums["count"], mask.sum() * np.prod(shape[1:-1]))


def _tiny_resnet():
    return models.CifarResNet(depth=8, num_classes=5, widths=(4, 8, 8))


def _batch(rng, n=16):
    return {"inputs": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
            "targets": rng.integers(0, 5, n).astype(np.int32),
            "mask": np.ones(n, np.float32)}


def _run_steps(devices, steps=3):
    model, tx = _tiny_resnet(), optax.sgd(0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    mesh = data_mesh(devices)
    state = replicate(create_train_state(model, tx, jnp.zeros((1, 8, 8, 3)), seed=0), mesh)
    step = make_train_step(model, tx)
    for _ in range(steps):
        state, metrics = step(state, shard_batch(_batch(rng), mesh), {})
    return state, metrics


def test_step_on_8_devices_equals_step_on_1_device():
    assert jax.device_count() == 8
    one, m1 = _run_steps(jax.devices()[:1])
    eight, m8 = _run_steps(jax.devices())
    assert eight.params["Conv_0"]["kernel"].sharding.device_set == set(jax.devices())
    for a, b in zip(jax.tree.leaves((one.params, one.batch_stats)),
                    jax.tree.leaves((eight.params, eight.batch_stats))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(m1["loss_sum"], m8["loss_sum"], rtol=1e-5)
    # and the step did move the parameters
    init = create_train_state(_tiny_resnet(), optax.sgd(0.1), jnp.zeros((1, 8, 8, 3)), seed=0)
    assert np.abs(np.asarray(one.params["Conv_0"]["kernel"]) - init.params["Conv_0"]["kernel"]).max() > 1e-3


def test_padded_rows_do_not_change_loss_or_gradient():
    model = models.MLP((16,), 5)
    tx = optax.sgd(0.5)
    rng = np.random.default_rng(1)
    batch = {"inputs": rng.normal(size=(6, 4)).astype(np.float32),
             "targets": rng.integers(0, 5, 6).astype(np.int32), "mask": np.ones(6, np.float32)}
    padded = {"inputs": np.concatenate([batch["inputs"], np.repeat(batch["inputs"][:1], 2, 0)]),
              "targets": np.concatenate([batch["targets"], batch["targets"][:1].repeat(2)]),
              "mask": np.array([1] * 6 + [0] * 2, np.float32)}
    state = create_train_state(model, tx, jnp.zeros((1, 4)), seed=0)
    step = make_train_step(model, tx, donate=False)
    a, ma = step(state, batch, {})
    b, mb = step(state, padded, {})
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert float(mb["count"]) == 6 and float(ma["loss_sum"]) == pytest.approx(float(mb["loss_sum"]))


def test_penalty_and_reparam_hooks_receive_traced_context():
    model = models.MLP((8,), 3)
    tx = optax.sgd(0.1)
    state = create_train_state(model, tx, jnp.zeros((1, 4)), seed=0)
    traces = []

    def penalty(latent, ctx):
        traces.append(1)
        return ctx["lam"] * sum(jnp.sum(x ** 2) for x in jax.tree.leaves(latent))

    def reparam(latent, ctx):
        return jax.tree.map(lambda w: w * ctx["scale"], latent)

    step = make_train_step(model, tx, reparam=reparam, penalty=penalty, donate=False)
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.normal(size=(4, 4)).astype(np.float32),
             "targets": np.array([0, 1, 2, 0], np.int32), "mask": np.ones(4, np.float32)}
    _, m1 = step(state, batch, {"lam": jnp.float32(0.1), "scale": jnp.float32(1.0)})
    _, m2 = step(state, batch, {"lam": jnp.float32(0.2), "scale": jnp.float32(0.5)})
    l2 = sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(state.params))
    assert float(m1["penalty"]) == pytest.approx(0.1 * l2, rel=1e-5)
    assert float(m2["penalty"]) == pytest.approx(0.2 * l2, rel=1e-5)
    assert len(traces) == 1  # a new context value did not recompile
    # the eval step sees the reparameterized weights
    ev = make_eval_step(model, reparam=reparam)
    zero = ev(state, batch, {"scale": jnp.float32(0.0)})
    assert float(zero["loss_sum"]) == pytest.approx(4 * np.log(3), rel=1e-5)
