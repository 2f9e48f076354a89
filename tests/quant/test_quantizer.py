"""The deployed quantizer against NumPy: levels, scale, the 1-bit case, STE gradients, bad bits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pae import quant as q


def ref_quantize(w, bits, r):
    """Independent float64 mid-rise quantizer: returns (levels, codes, step)."""
    w, bits, r = (np.asarray(a, np.float64) for a in (w, bits, r))
    o = (2.0 ** bits - 1) / 2
    d = 2 * r / (2.0 ** bits - 1)
    x = np.clip(w, -r, r) / np.where(d > 0, d, 1) + o
    c = np.clip(np.floor(x + 0.5), 0, 2 * o)
    return (c - o) * d, c, d, x


def _away_from_ties(x, tol=1e-3):
    return np.abs(x - np.floor(x) - 0.5) > tol


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_levels_scale_and_codes_match_numpy(bits):
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(bits), (3, 5, 7, 11)), np.float32)
    got = np.asarray(jax.jit(lambda w: q.quantize(w, bits))(w))
    r = np.abs(w).max(axis=(0, 1, 2))
    want, codes, d, x = ref_quantize(w, bits, r)
    ok = _away_from_ties(x)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(q.max_abs_range(w)), r, rtol=0)
    np.testing.assert_allclose(np.asarray(q.step_size(bits, r)), d, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: q.codes(w, bits, r))(w))[ok], codes[ok])
    # every value is a grid level (k - o) * delta of its column, within delta / 2 of w
    k = got / d + (2 ** bits - 1) / 2
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert k.min() > -1e-3 and k.max() < 2 ** bits - 1 + 1e-3
    assert np.all(np.abs(got - w) <= d / 2 * (1 + 1e-5))
    # the max-abs entry of each column lands on +-R exactly (up to float)
    idx = np.abs(w).reshape(-1, 11).argmax(0)
    flat_w, flat_q = w.reshape(-1, 11), got.reshape(-1, 11)
    np.testing.assert_allclose(np.abs(flat_q[idx, np.arange(11)]), r, rtol=1e-6)
    np.testing.assert_allclose(np.sign(flat_q[idx, np.arange(11)]), np.sign(flat_w[idx, np.arange(11)]))


def test_one_bit_is_plus_minus_half_step_never_zero():
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (13, 6)), np.float32)
    got = np.asarray(jax.jit(lambda w: q.quantize(w, 1))(w))
    r = np.abs(w).max(0)
    np.testing.assert_allclose(np.abs(got), np.broadcast_to(r, w.shape), rtol=1e-6)
    np.testing.assert_array_equal(np.sign(got), np.sign(w))
    np.testing.assert_allclose(np.asarray(q.step_size(1, r)) / 2, r, rtol=1e-6)   # levels +-delta/2
    # all-zero channel dequantizes to exactly 0
    z = np.asarray(q.quantize(np.zeros((4, 3), np.float32), 3))
    np.testing.assert_array_equal(z, 0.0)


def test_per_channel_bits_broadcast_and_a_learned_clip():
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (9, 5)), np.float32)
    bits = np.array([1, 2, 3, 5, 8, 4, 6, 7, 2], np.float32)[:, None]      # per input channel
    r = 0.6 * np.abs(w).max(0)
    got = np.asarray(jax.jit(lambda w, b, r: q.quantize(w, b, r, learned_range=True))(w, bits, r))
    want, _, d, x = ref_quantize(w, bits, r)
    ok = _away_from_ties(x)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6, atol=1e-6)
    assert np.abs(got).max() <= r.max() * (1 + 1e-6)      # clipped to [-R, R]


def test_ste_gradients_match_numpy():
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (7, 4, 6)), np.float32)
    c = np.asarray(jax.random.normal(jax.random.PRNGKey(4), w.shape), np.float32)
    bits = np.array([2, 3, 4, 8], np.float32)[:, None]
    # max-abs range: dQ/dw = 1 everywhere
    g = jax.jit(jax.grad(lambda w: jnp.sum(q.quantize(w, bits) * c)))(w)
    np.testing.assert_allclose(np.asarray(g), c, rtol=1e-6)
    # learned clip: dQ/dw = 1 inside [-R, R], 0 outside; dQ/dR LSQ-style
    r = 0.7 * np.abs(w).max(axis=(0, 1))
    gw, gr = jax.jit(jax.grad(lambda w, r: jnp.sum(q.quantize(w, bits, r, learned_range=True) * c),
                              argnums=(0, 1)))(w, r)
    inside = np.abs(w) < r
    np.testing.assert_allclose(np.asarray(gw), np.where(inside, c, 0.0), rtol=1e-6)
    _, codes, d, x = ref_quantize(w, bits, r)
    o = (2.0 ** bits - 1) / 2
    dq_dr = np.where(inside, ((codes - o) - w / d) / o, (codes - o) / o)
    ok = _away_from_ties(x).all(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(gr)[ok], (c * dq_dr).sum(axis=(0, 1))[ok], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, np.nan, [1, 9]])
def test_bits_outside_one_to_eight_raise(bad):
    w = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="bits"):
        q.quantize(w, bad)
    with pytest.raises(ValueError, match="bits"):
        q.codes(w, bad, np.ones(2))


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf, [1.0, -0.5]])
def test_a_negative_or_non_finite_range_raises(bad):
    w = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"r \(the clip range R\) must be finite and >= 0"):
        q.quantize(w, 3, bad)
    with pytest.raises(ValueError, match="clip range"):
        q.codes(w, 3, bad)
    with pytest.raises(ValueError, match="clip range"):
        q.step_size(3, bad)
    with pytest.raises(ValueError, match="bits"):
        q.step_size(0, 1.0)
    for b_min, b_max in ((0, 8), (1, 9), (8, 1)):
        with pytest.raises(ValueError, match="b_m"):
            q.bits_from_logits(0.0, b_min, b_max)
    np.testing.assert_array_equal(q.quantize(w, 3, 0.0), 0.0)      # R = 0 (an all-zero channel): 0


def test_width_parameterization_roundtrip_and_bounds():
    for b in (1.5, 3.0, 6.0, 7.9):
        theta = q.quantizer.logits_for_bits(b, 1.0, 8.0)
        assert float(q.bits_from_logits(theta, 1.0, 8.0)) == pytest.approx(b, rel=1e-5)
    big = np.asarray(q.bits_from_logits(np.array([-50.0, 50.0]), 2.0, 6.0))
    np.testing.assert_allclose(big, [2.0, 6.0])
    with pytest.raises(ValueError, match="b_init"):
        q.quantizer.logits_for_bits(8.0, 1.0, 8.0)


def test_clip_boundary_gets_the_whole_gradient_and_bf16_keeps_exact_levels():
    """At ``w == R`` (the max-abs element when a learned range starts at the max-abs) dQ/dw is 1,
    not ``jnp.clip``'s 1/2; activations likewise at ``x == R`` and at 0 on the unsigned grid. A
    bfloat16 kernel is quantized to float32 levels, those of its float32 values, exactly."""
    w = np.array([[0.7, -0.3, 0.2], [-0.5, 0.1, 0.4]], np.float32)        # (K, N): column max-abs
    r = np.abs(w).max(axis=0)
    g = jax.grad(lambda w: jnp.sum(q.quantize(w, 4, r, learned_range=True)))(w)
    np.testing.assert_array_equal(np.asarray(g), np.ones_like(w))
    from pae.quant import activations as qa
    x = np.array([[0.0, 0.5, 1.0, 1.5]], np.float32)
    gx = jax.grad(lambda x: jnp.sum(qa.quantize_act(x, 4, 1.0, True)))(x)
    np.testing.assert_array_equal(np.asarray(gx), [[1.0, 1.0, 1.0, 0.0]])
    wb = jnp.asarray(np.random.default_rng(0).normal(size=(16, 5)), jnp.bfloat16)
    for bits in (2, 4, 8):
        got = q.quantize(wb, bits)
        assert got.dtype == jnp.float32
        want, *_ = ref_quantize(np.asarray(wb, np.float32), bits, np.abs(np.asarray(wb, np.float32)).max(0))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
