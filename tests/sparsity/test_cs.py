"""Continuous Sparsification algebra, schedule, between-round rules, tickets and IMP vs NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pae import sparsity as sp
from pae.core import Context, label_roles, select as S

SHAPES = [(3, 5, 2, 7), (13, 1), (1, 17), (6,)]


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _tree(rng, shapes=SHAPES):
    return {f"layer{i}": {"kernel": rng.normal(size=s).astype(np.float32),
                          "bias": rng.normal(size=s[-1:]).astype(np.float32)}
            for i, s in enumerate(shapes)}


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("s_init", [0.0, -0.1, 0.37])
def test_soft_hard_masks_penalty_and_finalize_match_numpy(scaled, s_init):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    t = sp.continuous_sparsification(S.everything() & S.path("kernel"), s_init=s_init, lmbda=1e-3,
                                     scaled=scaled)
    latent = t.init(params, jax.random.PRNGKey(0))
    for node in jax.tree.leaves(latent, is_leaf=lambda x: isinstance(x, sp.SoftMask)):
        if isinstance(node, sp.SoftMask):
            assert node.logits.dtype == jnp.float32
            np.testing.assert_array_equal(node.logits, np.float32(s_init))
    # random logits, with exact zeros to check the strict >
    logits = {k: rng.normal(size=v["kernel"].shape).astype(np.float32) for k, v in params.items()}
    logits["layer0"].flat[::3] = 0.0
    latent = {k: {"kernel": sp.SoftMask(jnp.asarray(params[k]["kernel"]), jnp.asarray(logits[k]),
                                        jnp.float32(s_init), scaled),
                  "bias": params[k]["bias"]} for k in params}
    beta = 3.7
    ctx = Context.make(beta=beta)
    scale = 1.0 / np_sigmoid(s_init) if scaled else 1.0
    soft = jax.jit(t.apply)(latent, ctx)
    hard = jax.jit(t.finalize)(latent, ctx)
    pen = jax.jit(t.penalty)(latent, ctx)
    ref_pen = 0.0
    for k in params:
        m = np_sigmoid(beta * logits[k].astype(np.float64)) * scale
        np.testing.assert_allclose(soft[k]["kernel"], params[k]["kernel"] * m, rtol=1e-5, atol=1e-7)
        h = (logits[k] > 0) * scale
        np.testing.assert_allclose(hard[k]["kernel"], params[k]["kernel"] * h, rtol=1e-6)
        np.testing.assert_array_equal(soft[k]["bias"], params[k]["bias"])
        ref_pen += m.sum()
    np.testing.assert_allclose(pen, 1e-3 * ref_pen, rtol=1e-5)
    assert np.all(np.asarray(hard["layer0"]["kernel"]).flat[::3] == 0)  # s == 0 is pruned
    ref_density = np.mean(np.concatenate([logits[k].ravel() for k in params]) > 0)
    np.testing.assert_allclose(jax.jit(sp.density)(latent), ref_density, rtol=1e-6)


def test_density_counts_s_positive_not_float_zeros():
    # sigmoid(beta*s) never underflows to 0 here, yet half the entries are pruned
    latent = {"k": sp.SoftMask(jnp.ones((4, 4)), jnp.array([[-1e-3, 1e-3] * 2] * 4))}
    assert float(sp.density(latent)) == 0.5
    # and a huge negative s underflows sigmoid to exactly 0: still counted once, as pruned
    latent = {"k": sp.SoftMask(jnp.ones((2,)), jnp.array([-1e4, 2.0]))}
    assert float(sp.density(latent)) == 0.5
    with pytest.raises(ValueError, match="nothing is masked"):
        sp.density({"k": jnp.ones(3)})


def test_temperature_schedule():
    E, bT = 85, 200.0
    got = np.array([sp.temperature_schedule(e, E, bT) for e in range(E)])
    np.testing.assert_allclose(got, bT ** (np.arange(E) / (E - 1)), rtol=1e-12)
    assert got[0] == 1.0 and got[-1] == pytest.approx(200.0)
    np.testing.assert_allclose(got[[2, 42]], [1.13, 14.1], rtol=5e-3)  # the notes' sample values
    # the official code's recurrence beta <- beta * bT**(1/(E-1)) gives the same values
    beta, rec = 1.0, []
    for e in range(E):
        beta = beta * bT ** (1 / (E - 1)) if e > 0 else beta
        rec.append(beta)
    np.testing.assert_allclose(got, rec, rtol=1e-10)
    assert sp.temperature_schedule(0, 1, bT) == 1.0
    for kw, match in ((dict(epoch=0, epochs=3, beta_final=0.0), "beta_final must be > 0"),
                      (dict(epoch=0, epochs=3, beta_final=-2.0), "beta_final must be > 0"),
                      (dict(epoch=3, epochs=3), r"epoch must be in \[0, 3\)"),
                      (dict(epoch=0, epochs=0), "epochs must be >= 1")):
        with pytest.raises(ValueError, match=match):
            sp.temperature_schedule(**kw)
    with pytest.raises(TypeError, match="epoch must be an int, got 1.5"):
        sp.temperature_schedule(1.5, 3)


@pytest.mark.parametrize("rule", ["paper", "code"])
def test_between_round_reset(rule):
    rng = np.random.default_rng(1)
    s = rng.normal(scale=0.3, size=(5, 3, 2)).astype(np.float32)
    w = rng.normal(size=s.shape).astype(np.float32)
    latent = {"a": sp.SoftMask(jnp.asarray(w), jnp.asarray(s), jnp.float32(-0.05)), "b": jnp.ones(2)}
    out = jax.jit(lambda lat: sp.reset_logits(lat, rule, 200.0))(latent)
    ref = np.minimum((200.0 if rule == "paper" else 1.0) * s, -0.05)
    np.testing.assert_allclose(out["a"].logits, ref, rtol=1e-6)
    np.testing.assert_array_equal(out["a"].weight, w)
    with pytest.raises(ValueError, match="rule must be one of"):
        sp.reset_logits(latent, "both")


def test_ticket_and_rewind_keep_masks_and_take_checkpoint_weights():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(4, 3)).astype(np.float32)
    now = {"k": sp.SoftMask(jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), jnp.asarray(s),
                            jnp.float32(-0.2)),
           "b": jnp.full(3, 7.0)}
    old = {"k": sp.SoftMask(jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), jnp.zeros((4, 3))),
           "b": jnp.full(3, 1.0)}
    back = sp.rewind(now, old)
    np.testing.assert_array_equal(back["k"].weight, old["k"].weight)
    np.testing.assert_array_equal(back["k"].logits, s)  # s is never rewound
    np.testing.assert_array_equal(back["b"], 1.0)
    ticket = sp.to_ticket(now, old)   # the node's own s_init and scale
    assert isinstance(ticket["k"], sp.FixedMask)
    np.testing.assert_allclose(ticket["k"].mask, (s > 0) / np_sigmoid(-0.2), rtol=1e-6)
    np.testing.assert_array_equal(sp.to_ticket(now, old, binary=True)["k"].mask, (s > 0))
    unscaled = {"k": now["k"].replace(scaled=False), "b": now["b"]}
    np.testing.assert_array_equal(sp.to_ticket(unscaled, old)["k"].mask, (s > 0))
    np.testing.assert_array_equal(ticket["k"].weight, old["k"].weight)
    assert label_roles(ticket)["k"].mask == "frozen"
    np.testing.assert_allclose(sp.masked_params(ticket)["k"], old["k"].weight * ticket["k"].mask)
    assert float(sp.density(ticket)) == pytest.approx(np.mean(s > 0))
    with pytest.raises(ValueError, match="same tree structure"):
        sp.rewind(now, {"k": old["k"]})


def _np_imp(weights, masks, rate, scope):
    """Independent reference: threshold at the k-th smallest surviving magnitude."""
    def prune(ws, ms):
        alive = np.concatenate([np.abs(w[m]) for w, m in zip(ws, ms)])
        k = int(round(rate * alive.size))
        if k == 0:
            return [m.copy() for m in ms]
        thr = np.sort(alive)[k - 1]
        return [m & (np.abs(w) > thr) for w, m in zip(ws, ms)]
    if scope == "global":
        return prune(weights, masks)
    return [prune([w], [m])[0] for w, m in zip(weights, masks)]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_matches_numpy(scope):
    rng = np.random.default_rng(3)
    params = _tree(rng, [(7, 11), (3, 3, 2, 5), (29, 3)])
    latent = sp.with_unit_masks(params, S.kernels())
    names = ["layer0", "layer1", "layer2"]
    ws = [params[n]["kernel"] for n in names]
    ms = [np.ones(w.shape, bool) for w in ws]
    for _ in range(4):
        latent = sp.magnitude_prune(latent, 0.2, scope)
        ms = _np_imp(ws, ms, 0.2, scope)
        for n, m in zip(names, ms):
            np.testing.assert_array_equal(np.asarray(latent[n]["kernel"].mask) != 0, m)
    total = sum(w.size for w in ws)
    if scope == "global":
        expected = total
        for _ in range(4):
            expected -= int(round(0.2 * expected))
        assert float(sp.density(latent)) * total == pytest.approx(expected)
    assert sp.rounds_for_density(0.1) == 11 and sp.rounds_for_density(0.8) == 1
    with pytest.raises(ValueError, match="scope must be one of"):
        sp.magnitude_prune(latent, 0.2, "row")
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
        sp.magnitude_prune(latent, 1.5)
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\), got 1.0"):
        sp.rounds_for_density(0.1, rate=1.0)


def test_bad_inputs_raise_clear_errors():
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    for bad in (float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="s_init must be a finite number"):
            sp.continuous_sparsification(s_init=bad)
    with pytest.raises(ValueError, match="lmbda must be >= 0"):
        sp.continuous_sparsification(lmbda=-1.0)
    with pytest.raises(ValueError, match=r"select=path\('conv'\) matches no leaf.*Dense_0/kernel"):
        sp.continuous_sparsification(S.path("conv")).init(params, None)
    with pytest.raises(ValueError, match="beta must be finite and > 0, got 0"):
        Context.make(beta=0)
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        sp.SearchConfig(rounds=0)
    with pytest.raises(ValueError, match="reset must be one of"):
        sp.SearchConfig(reset="pap")
    with pytest.raises(ValueError, match="beta_final must be > 0"):
        sp.SearchConfig(beta_final=0.0)
    with pytest.raises(ValueError, match=r"rewind_epoch must be in \[0, epochs=3\), got 3"):
        sp.SearchConfig(epochs=3, rewind_epoch=3)
    with pytest.raises(ValueError, match=r"milestones must be epochs in \(0, epochs=10\), got \(56,\)"):
        sp.SearchConfig(epochs=10, milestones=(56,))  # would silently never decay
    with pytest.raises(TypeError, match="rounds must be an int, got 1.5"):
        sp.SearchConfig(rounds=1.5)
    with pytest.raises(ValueError, match="lr_decay must be finite and > 0"):
        sp.SearchConfig(lr_decay=-1.0)
    with pytest.raises(ValueError, match=r"mask for 'Dense_0/kernel' has shape \(4, 3\) but the "
                                         r"parameter has shape \(3, 4\)"):
        sp.attach_masks(params, {"Dense_0/kernel": np.ones((4, 3))})
    with pytest.raises(ValueError, match="not in params"):
        sp.attach_masks(params, {"Dense_1/kernel": np.ones((3, 4))})
    with pytest.raises(ValueError, match="s_init must be a finite number"):
        sp.cs_search(None, sp.SearchConfig(), [0.0, float("nan")])
    for bad in ([], [[0.0]], "0.1"):
        with pytest.raises(ValueError, match="s_init must be a float or a non-empty 1-D sequence"):
            sp.cs_search(None, sp.SearchConfig(), bad)


def test_search_config_numbers_are_type_checked_by_name():
    for name, bad in (("lr", None), ("lr", "0.1"), ("mask_lr", "a"), ("momentum", None),
                      ("weight_decay", "1e-4"), ("lr_decay", None), ("beta_final", True),
                      ("lmbda", "1e-8"), ("prune_rate", None)):
        with pytest.raises(TypeError, match=f"{name} must be a number, got {bad!r}"):
            sp.SearchConfig(**{name: bad})
    with pytest.raises(TypeError, match="milestones must be a sequence of epochs or None, got 5"):
        sp.SearchConfig(milestones=5)
    assert sp.SearchConfig(epochs=10, milestones=np.array([3, 5]), mask_lr=None,
                           lr=np.float32(0.05)).decay_epochs == (3, 5)


@pytest.mark.parametrize("kwargs, says", [({"momentum": 5.0}, r"momentum must be in \[0, 1\).*got 5.0"),
                                          ({"momentum": 1.0}, r"momentum must be in \[0, 1\).*got 1.0"),
                                          ({"seed": -1}, "seed must be >= 0, got -1")])
def test_search_config_refuses_diverging_momentum_and_negative_seeds(kwargs, says):
    """momentum >= 1 made SGD diverge; a negative seed failed later inside the engine."""
    with pytest.raises(ValueError, match=says):
        sp.SearchConfig(**kwargs)
    assert sp.SearchConfig(momentum=0.0, seed=0).momentum == 0.0   # the edges still allowed


def test_beta_and_shapes_are_checked_where_a_context_or_latent_enters():
    """beta <= 0 (which would silently invert the mask) and mask/weight shape mismatches are caught
    at every public entry, not only in Context.make; messages name the argument or leaf path."""
    t = sp.continuous_sparsification()
    latent = t.init({"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}, None)
    ctx = Context.make(beta=2.0)
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="beta must be finite and > 0"):
            t.apply(latent, ctx.replace(beta=jnp.float32(beta)))
        with pytest.raises(ValueError, match="beta must be finite and > 0"):
            sp.soft_mask(jnp.zeros(3), beta)
    with pytest.raises(TypeError, match="ctx must carry the inverse temperature beta"):
        t.penalty(latent, {})
    np.testing.assert_allclose(jax.jit(t.penalty)(latent, ctx), t.penalty(latent, ctx))  # traced: fine

    bad = {"Dense_0": {"kernel": sp.SoftMask(jnp.ones((3, 4)), jnp.zeros((4,))), "bias": jnp.ones(4)}}
    with pytest.raises(ValueError, match=r"mask for 'Dense_0/kernel' has shape \(4,\)"):
        t.apply(bad, ctx)
    broadcastable = {"k": sp.FixedMask(jnp.ones((4, 1)), jnp.ones((4, 3)))}
    with pytest.raises(ValueError, match=r"mask for 'k' has shape \(4, 3\) but the parameter has "
                                         r"shape \(4, 1\)"):
        sp.masked_params(broadcastable)
    with pytest.raises(ValueError, match=r"checkpoint leaf 'Dense_0/kernel' has shape \(5, 5\)"):
        sp.rewind(latent, {"Dense_0": {"kernel": sp.SoftMask(jnp.ones((5, 5)), jnp.ones((5, 5))),
                                       "bias": jnp.ones(4)}})
    with pytest.raises(ValueError, match=r"mask for 'Dense_0/kernel' has shape \(3, 4\) but the "
                                         r"parameter has shape \(2, 2\)"):
        sp.to_ticket(latent, {"Dense_0": {"kernel": sp.SoftMask(jnp.ones((2, 2)), jnp.ones((2, 2))),
                                          "bias": jnp.ones(4)}})
    with pytest.raises(ValueError, match="beta_final must be a finite number"):
        sp.reset_logits(latent, "paper", float("nan"))
    assert Context.make(key=np.int64(3)).key.shape == (2,)  # integer-like seeds become PRNG keys


def test_default_lr_decays_follow_the_official_56_71_of_85_for_any_round_length():
    assert sp.SearchConfig().decay_epochs == (56, 71)
    assert sp.SearchConfig(epochs=10, rewind_epoch=1).decay_epochs == (7, 8)
    assert sp.SearchConfig(epochs=10, rewind_epoch=1, milestones=[3]).decay_epochs == (3,)
    assert sp.SearchConfig(epochs=10, rewind_epoch=1, milestones=()).decay_epochs == ()


def test_round_schedule_restarts_every_round_and_masks_skip_weight_decay():
    sched = sp.round_schedule(0.1, steps_per_epoch=3, epochs=5, milestones=(2, 4))
    per_step = [float(sched(c)) for c in range(30)]
    one_round = [0.1] * 6 + [0.01] * 6 + [0.001] * 3
    np.testing.assert_allclose(per_step, one_round * 2, rtol=1e-6)
    cfg = sp.SearchConfig(epochs=5, milestones=(2, 4), weight_decay=0.5, momentum=0.0, lr=1.0,
                          mask_lr=2.0)
    tx = sp.cs_optimizer(cfg, 3)
    latent = {"k": sp.SoftMask(jnp.full((2, 2), 3.0), jnp.full((2, 2), 0.1)), "b": jnp.ones(2)}
    grads = {"k": sp.SoftMask(jnp.zeros((2, 2)), jnp.ones((2, 2))), "b": jnp.zeros(2)}
    upd, _ = tx.update(grads, tx.init(latent), latent)
    np.testing.assert_allclose(upd["k"].weight, -1.0 * 0.5 * 3.0)   # coupled L2 on weights
    np.testing.assert_allclose(upd["b"], -0.5)                        # ... and on every other param
    np.testing.assert_allclose(upd["k"].logits, -2.0)                 # masks: own lr, no decay
    ticket = {"k": sp.FixedMask(jnp.full((2, 2), 3.0), jnp.ones((2, 2)))}
    ttx = sp.ticket_optimizer(cfg, 3)
    upd, _ = ttx.update({"k": sp.FixedMask(jnp.ones((2, 2)), jnp.ones((2, 2)))}, ttx.init(ticket), ticket)
    np.testing.assert_array_equal(upd["k"].mask, 0.0)                 # frozen


def test_parallel_runs_set_s_init_per_node_and_the_reset_reads_it():
    t = sp.continuous_sparsification(None, 0.3, scaled=False)
    latent = t.init({"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}, None)
    assert float(latent["d"]["kernel"].s_init) == np.float32(0.3) and latent["d"]["kernel"].scaled is False
    runs = jax.vmap(sp.with_s_init, in_axes=(None, 0))(latent, jnp.array([-0.1, 0.2]))
    np.testing.assert_array_equal(runs["d"]["kernel"].logits[:, 0, 0], np.float32([-0.1, 0.2]))
    moved = jax.tree.map(lambda x: x + 0.5, runs)   # logits and s_init up by 0.5
    reset = jax.vmap(lambda lat: sp.reset_logits(lat, "code"))(moved)
    np.testing.assert_allclose(reset["d"]["kernel"].logits[:, 0, 0], [0.4, 0.7], rtol=1e-6)
    with pytest.raises(ValueError, match="s_init must be a finite number"):
        sp.with_s_init(latent, float("inf"))
