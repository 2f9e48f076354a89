"""Width and stage-duration schedules against hand-computed values."""
import numpy as np
import pytest

from pae import growth


def test_width_schedule_quarter_width_plus_20_percent_rounded_to_even():
    ws = growth.width_schedule({"a": 64, "b": 32, "c": 16})
    assert len(ws) == 9
    assert [w["a"] for w in ws] == [16, 20, 24, 28, 34, 40, 48, 58, 64]
    assert [w["b"] for w in ws] == [8, 10, 12, 14, 16, 20, 24, 28, 32]
    assert [w["c"] for w in ws] == [4, 6, 8, 10, 12, 14, 16, 16, 16]     # at least one pair per step
    for prev, nxt in zip(ws, ws[1:]):
        assert all((nxt[g] - prev[g]) % 2 == 0 and nxt[g] >= prev[g] for g in prev)
    assert growth.width_schedule({"a": 64}, steps=2) == [{"a": 16}, {"a": 20}, {"a": 64}]
    assert growth.width_schedule({"a": 64, "b": 5}, steps=0) == [{"a": 64, "b": 5}]   # no growth: full width
    # the start keeps the final parity: 12/4 = 3 -> 4, 20/4 = 5 -> 4, 3/4 -> 1
    assert [growth.width_schedule({"a": n}, steps=1)[0]["a"] for n in (12, 20, 3, 2)] == [4, 4, 1, 2]
    assert growth.round_even(4.8) == 4 and growth.round_even(5.6) == 6 and growth.round_even(3.2) == 4


def _nearest_multiple_reference(paper, m):
    """Independent reference: each earlier width to the nearest multiple of m (halves up), clipped
    to [m, final], then a running maximum."""
    final, out = paper[-1], []
    for c in paper[:-1]:
        lo = (c // m) * m
        r = lo + m if c - lo >= m / 2 else lo
        out.append(max([min(final, max(m, r))] + out[-1:]))
    return out + [final]


@pytest.mark.parametrize("m", [4, 8, 16])
def test_width_schedule_rounded_to_a_multiple(m):
    final = {"a": 64, "b": 32, "c": 16, "d": 6, "e": 58}
    paper = growth.width_schedule(final)
    ws = growth.width_schedule(final, multiple=m)
    assert growth.width_schedule(final, multiple=2) == paper
    for g in final:
        got = [w[g] for w in ws]
        assert got == _nearest_multiple_reference([w[g] for w in paper], m), g
        assert all(c % m == 0 or c == final[g] for c in got)
        assert got == sorted(got) and got[-1] == final[g]
    assert [w["a"] for w in growth.width_schedule({"a": 64}, multiple=8)] == [16, 24, 24, 32, 32, 40, 48, 56, 64]
    assert [w["d"] for w in ws] == [6] * 9 if m >= 8 else True     # a group no wider than m starts full


def test_stage_epochs_exponential_fixed_and_total():
    assert growth.stage_epochs(9, 10) == [10, 12, 14, 17, 20, 24, 29, 35, 42]
    assert growth.stage_epochs(9, 10, total=200) == [10, 12, 14, 17, 20, 24, 29, 35, 39]
    assert growth.stage_epochs(3, 4, kind="fixed") == [4, 4, 4]
    assert growth.stage_epochs(3, 4, kind="fixed", total=20) == [4, 4, 12]


def test_bad_schedules_fail_clearly():
    with pytest.raises(ValueError, match="width of group 'a' must be an int >= 1"):
        growth.width_schedule({"a": 0})
    for bad in (3, 0, 2.0, True):
        with pytest.raises(ValueError, match="multiple must be an even int >= 2"):
            growth.width_schedule({"a": 64}, multiple=bad)
    with pytest.raises(ValueError, match="group 'b' has an odd width 5; multiple=8"):
        growth.width_schedule({"a": 64, "b": 5}, multiple=8)
    with pytest.raises(ValueError, match="start_fraction"):
        growth.width_schedule({"a": 64}, start_fraction=0)
    with pytest.raises(ValueError, match="total=50 epochs leave nothing"):
        growth.stage_epochs(9, 8, total=50)
    with pytest.raises(ValueError, match="kind must be one of"):
        growth.stage_epochs(9, 8, kind="linear")


def test_bad_epoch_growth_and_total_fail_clearly():
    """A negative or NaN growth shrank or broke the stages silently; a float total was used as is."""
    assert growth.stage_epochs(3, 8, growth=0.0) == [8, 8, 8]
    assert growth.stage_epochs(3, 8, growth=np.float32(0.5), total=np.int64(40)) == [8, 12, 20]
    for bad in (-0.5, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="growth must be a finite number >= 0"):
            growth.stage_epochs(4, 8, growth=bad)
        with pytest.raises(ValueError, match="VTConfig.epoch_growth must be a finite number >= 0"):
            growth.VTConfig(epoch_growth=bad)
    for bad in ("0.2", None, True):
        with pytest.raises(TypeError, match="growth must be a finite number >= 0"):
            growth.stage_epochs(4, 8, growth=bad)
        with pytest.raises(TypeError, match="VTConfig.epoch_growth must be a finite number"):
            growth.VTConfig(epoch_growth=bad)
    for bad in (30.7, 30.0, "30", True):
        with pytest.raises(TypeError, match="total must be an int or None"):
            growth.stage_epochs(3, 8, total=bad)
        with pytest.raises(TypeError, match="VTConfig.total_epochs must be an int or None"):
            growth.VTConfig(total_epochs=bad)
