"""A batch larger than its split is refused before anything is allocated (issue 11, item 2).

``clamp=True`` (for evaluation) opts in to one batch of the split's size instead.
"""
from __future__ import annotations

import numpy as np
import pytest

from pae.data import ArraySource, check_batch_size, iterate_batches, num_batches


class CountingSource:
    """A source of ``n`` examples that records every ``take`` (so a test sees any allocation)."""

    def __init__(self, n):
        self.n, self.calls = n, []

    def __len__(self):
        return self.n

    def take(self, indices, rng=None):
        self.calls.append(len(indices))
        return {"inputs": np.zeros((len(indices), 3), np.float32),
                "targets": np.asarray(indices, np.int32)}


def test_issue_case_batch_100000_on_4000_examples_fails_at_the_call():
    src = CountingSource(4000)
    with pytest.raises(ValueError) as info:
        iterate_batches(src, 100_000, split="train")  # raised by the call itself, not by next()
    message = str(info.value)
    assert "batch_size=100000" in message  # the argument and its value
    assert "'train' split" in message and "4000 examples" in message  # the split and its size
    assert "batch_size <= 4000" in message  # what is allowed
    assert src.calls == []  # nothing was taken from the source
    with pytest.raises(ValueError, match="batch_size=100000 is larger than the 'train' split"):
        num_batches(4000, 100_000, split="train")
    with pytest.raises(ValueError, match="batch_size=100000"):
        num_batches(4000, 100_000, drop_remainder=True)  # would have been 0 steps per epoch


@pytest.mark.parametrize("n", [1, 7, 64])
def test_batch_equal_to_the_split_is_one_full_batch(n):
    src = CountingSource(n)
    batches = list(iterate_batches(src, n, seed=1))
    assert num_batches(n, n) == len(batches) == 1
    np.testing.assert_array_equal(batches[0]["mask"], np.ones(n, np.float32))
    np.testing.assert_array_equal(np.sort(batches[0]["targets"]), np.arange(n))
    with pytest.raises(ValueError, match=f"batch_size={n + 1} is larger"):
        iterate_batches(src, n + 1)


@pytest.mark.parametrize("n,batch,processes,rows", [(10, 64, 1, 10), (10, 64, 4, 12), (10, 8, 2, 8)])
def test_clamp_gives_the_split_in_one_batch_for_evaluation(n, batch, processes, rows):
    """``clamp=True``: ``min(batch, ceil(n / P) * P)`` rows; every example once, padding masked."""
    src = ArraySource({"inputs": np.arange(n, dtype=np.float32)[:, None],
                       "targets": np.arange(n, dtype=np.int32)})
    parts = [list(iterate_batches(src, batch, shuffle=False, clamp=True, process_index=p,
                                  process_count=processes)) for p in range(processes)]
    expected_batches = -(-n // rows)
    assert num_batches(n, batch, clamp=True) == expected_batches
    assert all(len(part) == expected_batches for part in parts)
    first = [part[0] for part in parts]
    assert sum(len(b["mask"]) for b in first) == rows
    seen = np.concatenate([b["targets"][b["mask"] == 1] for part in parts for b in part])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))


def test_clamp_with_drop_remainder_is_refused():
    with pytest.raises(ValueError, match="drop_remainder"):
        iterate_batches(CountingSource(10), 64, clamp=True, drop_remainder=True)
    with pytest.raises(ValueError, match="drop_remainder"):
        num_batches(10, 64, drop_remainder=True, clamp=True)


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                       (True, TypeError), ("8", TypeError)])
def test_bad_batch_size_type_or_value(bad, error):
    with pytest.raises(error, match="batch_size"):
        iterate_batches(CountingSource(10), bad)
    with pytest.raises(error, match="batch_size"):
        iterate_batches(CountingSource(10), bad, clamp=True)
    with pytest.raises(error, match="batch_size"):
        num_batches(10, bad)


def test_check_batch_size_names_the_argument_for_an_upfront_check():
    check_batch_size(np.int64(360), 360, argument="eval_batch_size", split="test")  # boundary: fine
    with pytest.raises(ValueError) as info:
        check_batch_size(512, 360, argument="eval_batch_size", split="test")
    assert str(info.value) == ("eval_batch_size=512 is larger than the 'test' split, which has 360 "
                               "examples; use eval_batch_size <= 360")
