"""Padding rows (``mask == 0``) change no BatchNorm statistic (issue 11, item 6).

A batch of real rows with garbage padding rows interleaved, applied in training with ``mask``, must
give the same outputs on the real rows and the same updated ``batch_stats`` as the batch of the real
rows alone. The first BN of the CIFAR ResNet is also checked against NumPy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pae.models import CifarResNet, MobileNetV1, ResNet, VGG, WideResNet, get_model

MASK = np.array([1, 0, 1, 1, 0, 0, 1, 1], np.float32)  # padding in the middle and at the end
REAL = np.flatnonzero(MASK)

BN_MODELS = {
    "cifar_resnet8": (lambda: CifarResNet(8, 10, widths=(4, 8, 8)), (8, 8, 3)),
    "wrn10_1": (lambda: WideResNet(10, 1, 10), (8, 8, 3)),
    "vgg11": (lambda: VGG(11, 10), (32, 32, 3)),
    "resnet_basic": (lambda: ResNet((1, 1, 1, 1), False, 10), (16, 16, 3)),
    "resnet_bottleneck": (lambda: ResNet((1, 1, 1, 1), True, 10), (16, 16, 3)),
    "mobilenet_v1": (lambda: MobileNetV1(10, alpha=0.25), (32, 32, 3)),
}


def _batch(shape, seed=0):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(len(REAL),) + shape).astype(np.float32)
    full = (50.0 + 100.0 * rng.normal(size=(len(MASK),) + shape)).astype(np.float32)  # garbage
    full[REAL] = real
    return real, full


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def _assert_trees_close(a, b, rtol, atol):
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def _max_tree_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", list(BN_MODELS))
def test_padding_rows_change_no_batchnorm_statistic(name):
    build, shape = BN_MODELS[name]
    model = build()
    real, full = _batch(shape)
    variables = model.init(jax.random.key(0), jnp.asarray(real), train=False)
    assert "batch_stats" in variables

    apply = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask=m, mutable=["batch_stats"]))
    out_real, new_real = model.apply(variables, jnp.asarray(real), train=True,
                                     mutable=["batch_stats"])
    out_full, new_full = apply(variables, jnp.asarray(full), jnp.asarray(MASK))

    np.testing.assert_allclose(np.asarray(out_full)[REAL], np.asarray(out_real), rtol=1e-4,
                               atol=1e-4)
    _assert_trees_close(new_full, new_real, rtol=1e-4, atol=1e-5)
    # the running statistics did move (the comparison above is not between two unchanged trees)
    assert _max_tree_diff(new_real["batch_stats"], variables["batch_stats"]) > 1e-3

    # without the mask the garbage rows do enter the statistics: the test can tell the difference
    _, new_unmasked = model.apply(variables, jnp.asarray(full), train=True, mutable=["batch_stats"])
    assert _max_tree_diff(new_unmasked, new_real) > 1e-2


@pytest.mark.parametrize("name", ["cifar_resnet8", "wrn10_1"])
def test_mask_none_means_all_rows_are_real_and_eval_ignores_mask(name):
    build, shape = BN_MODELS[name]
    model = build()
    _, full = _batch(shape, seed=1)
    x = jnp.asarray(full / 100.0)
    variables = model.init(jax.random.key(1), x, train=False)
    ones = jnp.ones(len(MASK))
    out_none, stats_none = model.apply(variables, x, train=True, mutable=["batch_stats"])
    out_ones, stats_ones = model.apply(variables, x, train=True, mask=ones, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(out_none), np.asarray(out_ones), rtol=1e-5, atol=1e-6)
    _assert_trees_close(stats_none, stats_ones, rtol=1e-5, atol=1e-7)
    # evaluation uses the running averages: mask has no effect
    eval_plain = model.apply(variables, x, train=False)
    eval_masked = model.apply(variables, x, train=False, mask=jnp.asarray(MASK))
    np.testing.assert_array_equal(np.asarray(eval_plain), np.asarray(eval_masked))


def _numpy_conv3x3_same(x, kernel):
    """``y[n,i,j,f] = sum_{dy,dx,c} xpad[n,i+dy,j+dx,c] k[dy,dx,c,f]``: stride 1, zero padding 1."""
    n, h, w, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((n, h, w, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            y += np.einsum("nhwc,cf->nhwf", xp[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
    return y


def test_first_batchnorm_statistics_match_numpy_over_real_rows():
    model = CifarResNet(8, 10, widths=(4, 8, 8))
    real, full = _batch((8, 8, 3), seed=2)
    variables = model.init(jax.random.key(2), jnp.asarray(real), train=False)
    _, new = model.apply(variables, jnp.asarray(full), train=True, mask=jnp.asarray(MASK),
                         mutable=["batch_stats"])
    y = _numpy_conv3x3_same(real, np.asarray(variables["params"]["Conv_0"]["kernel"]))
    mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))  # biased variance, as flax
    stats = new["batch_stats"]["BatchNorm_0"]
    # running averages start at mean 0, var 1; momentum 0.9 (PyTorch's 0.1)
    np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [np.ones(7), np.ones((8, 1)), np.float32(1.0)],
                         ids=["short", "2d", "scalar"])
def test_mask_of_the_wrong_shape_is_a_value_error(bad):
    model = CifarResNet(8, 10, widths=(4, 8, 8))
    x = jnp.zeros((8, 8, 8, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match=r"mask must have shape \[batch\] = \(8,\)"):
        model.apply(variables, x, train=True, mask=bad, mutable=["batch_stats"])


@pytest.mark.parametrize("name,shape,dtype", [
    ("lenet300_100", (4, 28, 28, 1), jnp.float32),
    ("lenet5", (4, 28, 28, 1), jnp.float32),
    ("conv2", (4, 16, 16, 3), jnp.float32),
    ("char_lstm", (4, 9), jnp.int32),
    ("transformer_lm", (4, 9), jnp.int32),
])
def test_models_without_batchnorm_accept_and_ignore_mask(name, shape, dtype):
    kw = {"hidden": 16, "embed": 8} if name == "char_lstm" else (
        {"width": 16, "depth": 1, "heads": 2, "max_len": 16} if name == "transformer_lm" else {})
    model = get_model(name, 11, **kw)
    x = (jax.random.randint(jax.random.key(0), shape, 0, 11) if dtype == jnp.int32
         else jax.random.normal(jax.random.key(0), shape))
    variables = model.init(jax.random.key(1), x)
    assert "batch_stats" not in variables
    plain = model.apply(variables, x, train=True)
    masked = model.apply(variables, x, train=True, mask=jnp.array([1.0, 0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(masked))
    assert np.all(np.isfinite(np.asarray(plain)))
