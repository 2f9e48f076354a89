"""Knowledge distillation (pae.train.Distill): the loss and its gradient against NumPy; a teacher from
a kept snapshot or given arrays trains the same student; the student learns the teacher's function
from labels that carry none; resume and parallel runs; bad input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pae.train import Distill, Phase, distillation_loss, init_state, make_task, train_phases


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference(s, t, y, mask, weight, temp):
    s, t = s.astype(np.float64), t.astype(np.float64)
    ls = _log_softmax(s)
    ce = -np.take_along_axis(ls, y[..., None], -1)[..., 0]
    pt, lst = np.exp(_log_softmax(t / temp)), _log_softmax(s / temp)
    kl = (pt * (np.log(pt) - lst)).sum(-1)
    w = np.broadcast_to(mask.reshape(mask.shape + (1,) * (ce.ndim - 1)), ce.shape)
    n = w.sum()
    return (1 - weight) * (ce * w).sum() / n + weight * temp ** 2 * (kl * w).sum() / n


@pytest.mark.parametrize("shape", [(6,), (4, 5)])   # classification, and a sequence of tokens
@pytest.mark.parametrize("weight,temp", [(1.0, 1.0), (0.5, 2.0), (0.0, 3.0), (0.3, 0.5)])
def test_loss_and_gradient_match_numpy(shape, weight, temp):
    rng = np.random.default_rng(0)
    s = rng.normal(size=shape + (7,)).astype(np.float32) * 2
    t = rng.normal(size=shape + (7,)).astype(np.float32) * 2
    y = rng.integers(0, 7, size=shape)
    mask = np.array([1, 1, 0, 1, 1, 0][:shape[0]], np.float32)
    loss, sums = distillation_loss(s, t, y, mask, weight, temp)
    np.testing.assert_allclose(loss, _reference(s, t, y, mask, weight, temp), rtol=1e-5, atol=1e-6)
    assert float(sums["count"]) == mask.sum() * (shape[1] if len(shape) > 1 else 1)
    grad = np.asarray(jax.grad(lambda z: distillation_loss(z, t, y, mask, weight, temp)[0])(s))
    # d/ds: ((1 - w) (softmax(s) - onehot(y)) + w T (softmax(s/T) - softmax(t/T))) * mask / count
    onehot = np.eye(7)[y]
    w = mask.reshape(mask.shape + (1,) * len(shape)) / float(sums["count"])
    want = ((1 - weight) * (np.exp(_log_softmax(s.astype(np.float64))) - onehot)
            + weight * temp * (np.exp(_log_softmax(s / temp)) - np.exp(_log_softmax(t / temp)))) * w
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


class MLP(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(3)(x)


def _data(shuffle_labels=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    train_y = rng.permutation(y[:200]) if shuffle_labels else y[:200]
    return {"train": (x[:200], train_y), "test": (x[200:], y[200:])}


def _adam(spe):
    return optax.adam(1e-2)


def test_the_student_learns_the_teachers_function_from_labels_that_carry_none():
    teacher = train_phases(make_task(MLP(), _data()), [Phase("fp", 15, _adam)],
                           init_state(MLP(), np.zeros((1, 5), np.float32), 0), batch_size=32)
    assert teacher.last("fp")["test_acc"] > 0.85
    noise = make_task(MLP(), _data(shuffle_labels=True))    # train labels permuted: no signal
    start = init_state(MLP(), np.zeros((1, 5), np.float32), 1)
    plain = train_phases(noise, [Phase("s", 15, _adam)], start, batch_size=32)
    taught = train_phases(noise, [Phase("s", 15, _adam, distill=Distill(teacher.state))], start,
                          batch_size=32)
    x_test = _data()["test"][0]

    def predict(result):
        return np.asarray(MLP().apply({"params": result.state.params}, x_test).argmax(-1))

    assert plain.last("s")["test_acc"] < 0.7
    assert taught.last("s")["test_acc"] > plain.last("s")["test_acc"] + 0.2
    assert (predict(taught) == predict(teacher)).mean() > 0.9 > (predict(plain) == predict(teacher)).mean()
    # rows report the plain cross-entropy on the (permuted) labels, not the distillation loss
    assert taught.last("s")["train_loss"] > 0.8


def _phases(teacher, from_epoch=None):
    return [Phase("student", 3, _adam, distill=Distill(teacher, weight=0.7, temperature=2.0),
                  data_epochs_from=from_epoch)]


def test_a_kept_snapshot_and_given_arrays_teach_the_same_student_and_resume_exactly(tmp_path):
    task = make_task(MLP(), _data())
    state = init_state(MLP(), np.zeros((1, 5), np.float32), 0)
    teach = Phase("teach", 2, _adam, keep={2: "teacher"})
    whole = train_phases(task, [teach] + _phases("teacher"), state, batch_size=32)
    first = train_phases(task, [teach], state, batch_size=32)
    given = train_phases(task, _phases(first.state, from_epoch=2), first.state, batch_size=32)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(whole.state.params),
                 jax.device_get(given.state.params))
    plain = train_phases(task, [teach, Phase("student", 3, _adam)], state, batch_size=32)
    assert not np.allclose(plain.state.params["Dense_1"]["kernel"], whole.state.params["Dense_1"]["kernel"])
    cut = [teach, Phase("student", 1, _adam, distill=Distill("teacher", weight=0.7, temperature=2.0))]
    train_phases(task, cut, state, batch_size=32, checkpoint_dir=tmp_path, keep_checkpoints=1)
    resumed = train_phases(task, [teach] + _phases("teacher"), state, batch_size=32,
                           checkpoint_dir=tmp_path, extend_last_phase=True)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(whole.state.params))


def test_a_resume_must_distill_as_the_saved_phases_did(tmp_path):
    """The checkpoint records each phase's teacher (snapshot name, or a checksum of given arrays),
    weight and temperature: a resume with another teacher or weight is refused, with the same one it
    continues exactly; a phase appended after the saved ones may distill freely."""
    from pae.train import CheckpointError

    task = make_task(MLP(), _data())
    state = init_state(MLP(), np.zeros((1, 5), np.float32), 0)
    teacher = train_phases(task, [Phase("t", 2, _adam)], state, batch_size=32).state
    other = teacher.replace(params=jax.tree.map(lambda x: x + 1e-3, teacher.params))
    whole = train_phases(task, _phases(teacher), state, batch_size=32)
    cut = [Phase("student", 1, _adam, distill=Distill(teacher, weight=0.7, temperature=2.0))]
    train_phases(task, cut, state, batch_size=32, checkpoint_dir=tmp_path / "a", keep_checkpoints=1)
    for changed, says in ((_phases(other), "another teacher's arrays"),
                          ([Phase("student", 3, _adam, distill=Distill(teacher, weight=0.5, temperature=2.0))],
                           "weight 0.5"),
                          ([Phase("student", 3, _adam)], "distills from no teacher")):
        with pytest.raises(CheckpointError, match=f"phase 'student' distilled .*{says}"):
            train_phases(task, changed, state, batch_size=32, checkpoint_dir=tmp_path / "a",
                         extend_last_phase=True)
    resumed = train_phases(task, _phases(teacher), state, batch_size=32, checkpoint_dir=tmp_path / "a",
                           extend_last_phase=True)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(whole.state.params))
    plain = [Phase("fp", 1, _adam)]
    train_phases(task, plain, state, batch_size=32, checkpoint_dir=tmp_path / "b")
    more = train_phases(task, plain + [Phase("kd", 1, _adam, distill=Distill(teacher))], state,
                        batch_size=32, checkpoint_dir=tmp_path / "b")
    assert [r["phase"] for r in more.history] == ["fp", "kd"]


def test_parallel_runs_each_learn_from_their_own_snapshot():
    task = make_task(MLP(), _data())
    state = init_state(MLP(), np.zeros((1, 5), np.float32), 0)
    phases = [Phase("teach", 2, lambda spe: optax.inject_hyperparams(optax.adam)(1e-2), keep={2: "teacher"}),
              Phase("student", 2, _adam, distill=Distill("teacher", weight=0.5))]

    def set_lr(s, lr):
        return s.replace(opt_state=s.opt_state)   # the runs differ through their initial weights

    keys = jnp.arange(2)

    def setup(s, k):
        return s.replace(params=jax.tree.map(lambda x: x + 0.1 * k, s.params))

    par = train_phases(task, phases, state, batch_size=32, runs=keys, setup=setup)
    for k in range(2):
        one = train_phases(task, phases, state.replace(params=jax.tree.map(
            lambda x: x + 0.1 * k, state.params)), batch_size=32)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-6),
                     jax.device_get(par.state.params), jax.device_get(one.state.params))


def test_bad_distill_input_is_refused_naming_what_is_allowed():
    with pytest.raises(TypeError, match="teacher must be a snapshot name"):
        Distill(3)
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        Distill("t", weight=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Distill("t", temperature=0.0)
    with pytest.raises(TypeError, match="weight must be a number"):
        Distill("t", weight="half")
    with pytest.raises(TypeError, match="distill must be a pae.train.Distill"):
        Phase("p", 1, _adam, distill="teacher")
    task = make_task(MLP(), _data())
    state = init_state(MLP(), np.zeros((1, 5), np.float32), 0)
    with pytest.raises(ValueError, match=r"Distill teacher 'fp' is not a snapshot kept before it \(kept: "
                                         r"\['late'\]\)"):
        train_phases(task, [Phase("a", 1, _adam, keep={1: "late"}),
                            Phase("b", 1, _adam, distill=Distill("fp"))], state, batch_size=32)
    with pytest.raises(ValueError, match=r"teacher 'b' is not a snapshot kept before it \(kept: \[\]\)"):
        train_phases(task, [Phase("b", 1, _adam, keep={1: "b"}, distill=Distill("b"))], state,
                     batch_size=32)   # kept at its own end: too late to teach it
