"""Palette assignment on constructed cases and against a brute-force NumPy search; phase 2."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pae
from pae import quant as q


def ref_cost(b, a, gamma):
    """Per-weight cost written out independently: size a + gamma * implied extra distortion."""
    return a + gamma * (2 ** b - 1) / (2 * math.log(2) * 2 ** b) * ((2 ** b - 1) / (2 ** a - 1)) ** 2


def ref_choose(bits, n, low, high, gamma, overhead):
    """Every pair (l, h), scored three ways: split (each channel its cheaper level, + overhead when
    both are used), every channel at l, every channel at h."""
    best = None
    for lo, hi in itertools.product(range(low[0], low[1] + 1), range(high[0], high[1] + 1)):
        if lo > hi:
            continue
        picks, total = [], 0.0
        for b in bits:
            c_lo, c_hi = ref_cost(b, lo, gamma), ref_cost(b, hi, gamma)
            picks.append(lo if c_lo <= c_hi else hi)
            total += n * min(c_lo, c_hi)
        if len(set(picks)) > 1:
            total += overhead
        options = [(total, picks)] + [(sum(n * ref_cost(b, a, gamma) for b in bits), [a] * len(bits))
                                      for a in (lo, hi)]
        for cost, chosen in options:
            if best is None or cost < best[0] - 1e-9 * abs(best[0]):
                best = (cost, chosen)
    return tuple(sorted(set(best[1]))), np.array(best[1], np.float32)


def test_cost_is_minimal_at_the_learned_width():
    grid = np.linspace(1, 8, 7001)
    for b in (1.7, 2.5, 4.0, 6.3):
        cost = q.level_cost(np.array([b]), grid)[0]
        assert abs(grid[np.argmin(cost)] - b) < 2e-3
        np.testing.assert_allclose(cost, ref_cost(b, grid, 1.0), rtol=1e-12)


def test_constructed_cases():
    # every channel learned 6 bits: a one-level palette at 6
    assert q.choose_palette(np.full(10, 6.0), 50)[0] == (6,)
    # bimodal widths: (2, 7), each channel to its own mode
    bits = np.array([2.0, 7.0, 2.0, 2.0, 7.0, 7.0, 2.0])
    palette, assigned = q.choose_palette(bits, 100)
    assert palette == (2, 7)
    np.testing.assert_array_equal(assigned, bits)
    # a huge second-segment overhead: one level for the whole layer
    palette, assigned = q.choose_palette(bits, 100, overhead_bits=1e9)
    assert len(palette) == 1 and np.all(assigned == palette[0])
    # one channel prefers 1 bit, 63 prefer 6: the split saves less than its second segment costs
    # (scales + permutation), so every channel goes to 6 bits (one segment, no overhead)
    bits = np.full(64, 6.0)
    bits[0] = 1.05
    overhead = 32.0 * 64 + 32.0 * 64
    palette, assigned = q.choose_palette(bits, 64, overhead_bits=overhead)
    assert palette == (6,) and np.all(assigned == 6)
    split = 64 * (q.level_cost(bits[1:], np.array([6.0])).sum()
                  + q.level_cost(bits[:1], np.array([1.0])).sum())
    assert split + overhead > q.level_cost(bits, np.array([6.0])).sum() * 64
    assert q.choose_palette(bits, 64)[0] == (1, 6)                     # without overhead: the split
    # uniform option: one level in [1, 8]
    palette, assigned = q.choose_palette(np.full(5, 3.0), 10, levels=1)
    assert palette == (3,) and np.all(assigned == 3)
    # a fixed palette: channels pick the cheaper of its two levels
    palette, assigned = q.choose_palette(np.array([1.2, 3.9, 4.6, 7.7]), 8, fixed=(3, 6))
    assert palette == (3, 6)
    np.testing.assert_array_equal(assigned, [3, 3, 6, 6])
    # rounding down costs more than rounding up: 2.5 learned bits go to 3, not 2
    assert q.choose_palette(np.array([2.5]), 1, fixed=(2, 3), low=(1, 4), high=(3, 8))[1][0] == 3


def test_matches_a_brute_force_search_on_random_widths():
    rng = np.random.default_rng(0)
    for trial in range(12):
        c = int(rng.integers(1, 40))
        bits = rng.uniform(1, 8, c)
        n = int(rng.integers(1, 300))
        gamma = float(rng.choice([0.0, 0.3, 1.0, 4.0]))
        overhead = float(rng.choice([0.0, 32.0 * 7, 1e4]))
        low, high = ((1, 4), (4, 8)) if trial % 2 else ((2, 3), (5, 7))
        got = q.choose_palette(bits, n, low=low, high=high, distortion_weight=gamma,
                               overhead_bits=overhead)
        want = ref_choose(bits, n, low, high, gamma, overhead)
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])


def test_bad_palettes_raise():
    bits = np.array([3.0, 6.0])
    with pytest.raises(ValueError, match=r"level 5 is outside its range \[1, 4\]"):
        q.choose_palette(bits, 4, fixed=(5, 6))
    with pytest.raises(ValueError, match=r"level 3 is outside its range \[4, 8\]"):
        q.choose_palette(bits, 4, fixed=(2, 3))
    with pytest.raises(ValueError, match="bits"):
        q.choose_palette(bits, 4, fixed=(0, 6))
    with pytest.raises(ValueError, match="low"):
        q.choose_palette(bits, 4, low=(0, 4))
    with pytest.raises(ValueError, match="high"):
        q.choose_palette(bits, 4, high=(4, 9))
    with pytest.raises(ValueError, match="levels"):
        q.choose_palette(bits, 4, levels=3)
    with pytest.raises(ValueError, match="levels"):
        q.choose_palette(bits, 4, levels=True)
    with pytest.raises(ValueError, match="fixed"):
        q.choose_palette(bits, 4, fixed=(2,))
    with pytest.raises(ValueError, match="NoisyWeight"):
        q.assign_palette({"w": jnp.ones((2, 2))})
    for kwargs, match in (({"weights_per_channel": 0}, "weights_per_channel"),
                          ({"weights_per_channel": -64}, "weights_per_channel"),
                          ({"weights_per_channel": 2.5}, "weights_per_channel"),
                          ({"distortion_weight": -1.0}, "distortion_weight"),
                          ({"overhead_bits": np.nan}, "overhead_bits")):
        kwargs = {"weights_per_channel": 4, **kwargs}
        with pytest.raises(ValueError, match=match):
            q.choose_palette(bits, **kwargs)
    with pytest.raises(ValueError, match="bits must lie in"):
        q.choose_palette(np.array([3.0, 9.5]), 4)
    with pytest.raises(ValueError, match="no QuantWeight"):
        q.palette_quantizer().init({"w": jnp.ones((2, 2))}, None)


def test_assign_palette_on_a_latent_and_the_phase_two_quantizer():
    # 48 K rows x 64 columns, half the rows near 2 bits and half near 7: the split saves 5 bits per
    # weight of 24 rows, more than its second segment costs (a 32-bit scale per column and a
    # 32-bit permutation entry per row)
    params = {"Dense_0": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (48, 64))},
              "Dense_1": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (5, 4))}}
    t = q.noise_injection()
    latent = t.init(params, None)
    widths = jnp.tile(jnp.array([1.6, 7.2, 1.9, 6.8, 2.2, 7.0, 7.4, 1.5, 2.0, 6.9, 7.1, 1.8]), 4)
    theta = jnp.log((widths - 1) / 7 / (1 - (widths - 1) / 7))
    latent["Dense_0"]["kernel"] = latent["Dense_0"]["kernel"].replace(logits=theta)
    out = q.assign_palette(jax.device_get(latent))
    node = out["Dense_0"]["kernel"]
    assert isinstance(node, q.QuantWeight)
    pal, assigned = q.choose_palette(np.asarray(widths), 64, overhead_bits=32.0 * 64 + 32.0 * 48)
    np.testing.assert_array_equal(node.bits, assigned)
    np.testing.assert_array_equal(node.levels, pal)
    assert pal == (2, 7) and set(np.unique(node.bits)) == {2.0, 7.0}
    one = out["Dense_1"]["kernel"]          # untouched widths (all 6): a one-level palette, repeated
    np.testing.assert_array_equal(one.levels, [6.0, 6.0])
    np.testing.assert_array_equal(one.bits, 6.0)
    # phase 2: the deployed quantizer at each channel's palette width, STE gradient
    t2 = q.palette_quantizer()
    got = jax.jit(t2.apply)(out, pae.Context.make())["Dense_0"]["kernel"]
    want = q.quantize(node.weight, node.bits[:, None])
    np.testing.assert_array_equal(got, want)
    g = jax.grad(lambda lat: jnp.sum(t2.apply(lat, None)["Dense_0"]["kernel"] * 3.0))(out)
    np.testing.assert_allclose(g["Dense_0"]["kernel"].weight, 3.0)
    uni = q.assign_palette(jax.device_get(latent), levels=1)
    assert uni["Dense_0"]["kernel"].levels.shape == (1,)
    assert len(np.unique(uni["Dense_0"]["kernel"].bits)) == 1
