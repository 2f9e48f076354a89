"""The sharing recipe on the engine: no decay on coefficients, the official step schedule, a short run."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pae import sharing as sh
from pae.core import map_nodes, select as S
from pae.train import init_state, make_task, train_phases


def test_optimizer_decays_weights_not_coefficients_and_steps_the_lr():
    cfg = sh.SharingConfig(epochs=10, lr=0.1, momentum=0.0, weight_decay=0.5, coefficient_lr=0.3)
    assert cfg.decay_epochs == (3, 6, 8)                 # 60/120/160 of 200, scaled to 10 epochs
    assert sh.SharingConfig().decay_epochs == (60, 120, 160)
    params = {f"l{i}": {"kernel": np.ones((2, 2), np.float32)} for i in range(3)}
    params["bn"] = {"scale": np.ones(2, np.float32)}
    lat = sh.templates({"g": S.path("^l")}, 2).init(params, jax.random.PRNGKey(0))
    tx = sh.sharing_optimizer(cfg, steps_per_epoch=2)
    state = tx.init(lat)
    coef = lambda t: np.asarray(sh.coefficient_matrices(t)["g"][1])  # noqa: E731
    # gradient: 1 on every coefficient, 0 elsewhere
    grads = map_nodes(lambda n: n.replace(coefficients=jnp.ones_like(n.coefficients)),
                      jax.tree.map(jnp.zeros_like, lat), sh.SharedKernel)
    for step in range(7):                                # the lr drops x0.2 after epoch 3 (step 6)
        before = lat
        updates, state = tx.update(grads, state, lat)
        lat = optax.apply_updates(lat, updates)
        drop = 0.2 if step >= 6 else 1.0
        np.testing.assert_allclose(coef(lat), coef(before) - 0.3 * drop, rtol=1e-5)   # no decay
        np.testing.assert_allclose(lat.params["bn"]["scale"],
                                   before.params["bn"]["scale"] * (1 - 0.1 * drop * 0.5), rtol=1e-5)
        np.testing.assert_allclose(lat.banks["g"], before.banks["g"] * (1 - 0.1 * drop * 0.5), rtol=1e-5)
    with pytest.raises(ValueError, match="milestones must be epochs in"):
        sh.SharingConfig(epochs=10, milestones=(10,))
    with pytest.raises(ValueError, match="weight_decay must be finite"):
        sh.SharingConfig(weight_decay=-1.0)
    with pytest.raises(TypeError, match="transform must be a pae.Transform"):
        sh.sharing_phases(cfg, "templates")


def test_a_short_swrn_run_on_the_engine_trains_templates_and_coefficients(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8, 8, 3)).astype(np.float32)
    y = (x[:, :4].mean(axis=(1, 2, 3)) > 0).astype(np.int32)
    swrn = sh.swrn(16, 1, 2, num_classes=2)
    task = make_task(swrn.model, {"train": (x, y), "test": (x[:16], y[:16])})
    t = swrn.transform
    cfg = sh.SharingConfig(epochs=2, batch_size=16, lr=0.05)
    start = init_state(swrn.model, task.example, 0, t.init)
    first = jax.tree.map(np.asarray, start.params)
    out = train_phases(task, sh.sharing_phases(cfg, t), start, batch_size=16, checkpoint_dir=tmp_path / "ck")
    rows = out.rows("train")
    assert len(rows) == 2 and all(np.isfinite(r["train_loss"]) for r in rows)
    for stage in sh.STAGES:   # one shared block per stage: 2 layers, LSM off-diagonal in [0, 1]
        assert 0.0 <= rows[-1][f"lsm_{stage}"] <= 1.0
    new = out.state.params
    assert isinstance(new, sh.SharedParams)
    for stage in sh.STAGES:
        assert not np.allclose(new.banks[stage], first.banks[stage])
        assert not np.allclose(sh.coefficient_matrices(new)[stage][1],
                               sh.coefficient_matrices(first)[stage][1])
    # the latent (custom nodes with static fields) round-trips through the engine's checkpoints
    again = train_phases(task, sh.sharing_phases(cfg, t), start, batch_size=16,
                         checkpoint_dir=tmp_path / "ck")
    assert len(again.history) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again.state.params),
                 jax.tree.map(np.asarray, new))


def test_bad_config_values_raise_errors_naming_the_field():
    for kw, err, msg in ((dict(lr=None), TypeError, "lr must be a real number"),
                         (dict(coefficient_lr="0.1"), TypeError, "coefficient_lr must be a real number"),
                         (dict(momentum=True), TypeError, "momentum must be a real number"),
                         (dict(milestones=5), TypeError, "milestones must be a tuple of epochs"),
                         (dict(milestones=(60, 60)), ValueError, "milestones must be distinct")):
        with pytest.raises(err, match=msg):
            sh.SharingConfig(**kw)
    ok = sh.SharingConfig(lr=np.float32(0.05), coefficient_lr=jnp.float32(0.01), milestones=[3, 5])
    assert ok.milestones == (3, 5) and ok.decay_epochs == (3, 5)
