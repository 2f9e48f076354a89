"""Width and stage-duration schedules against hand-computed values."""
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


def test_stage_epochs_exponential_fixed_and_total():
    assert growth.stage_epochs(9, 10) == [10, 12, 14, 17, 20, 24, 29, 35, 42]
    assert growth.stage_epochs(9, 10, total=200) == [10, 12, 14, 17, 20, 24, 29, 35, 39]
    assert growth.stage_epochs(3, 4, kind="fixed") == [4, 4, 4]
    assert growth.stage_epochs(3, 4, kind="fixed", total=20) == [4, 4, 12]


def test_bad_schedules_fail_clearly():
    with pytest.raises(ValueError, match="width of group 'a' must be an int >= 1"):
        growth.width_schedule({"a": 0})
    with pytest.raises(ValueError, match="start_fraction"):
        growth.width_schedule({"a": 64}, start_fraction=0)
    with pytest.raises(ValueError, match="total=50 epochs leave nothing"):
        growth.stage_epochs(9, 8, total=50)
    with pytest.raises(ValueError, match="kind must be one of"):
        growth.stage_epochs(9, 8, kind="linear")
