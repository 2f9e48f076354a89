"""Algorithmic generators: determinism and solutions checked by independent solvers."""
from collections import deque

import numpy as np
import pytest

from pae.data import algorithmic as alg


@pytest.mark.parametrize("bits", [32, 48, 128, 512])
def test_prefix_sums_are_the_running_parity(bits):
    x, y = alg.prefix_sums(50, bits, seed=3)
    assert x.shape == (50, bits, 1) and x.dtype == np.float32
    assert y.shape == (50, bits) and y.dtype == np.int32
    assert set(np.unique(x)) == {0.0, 1.0}
    for s in range(50):            # an independent solver: a loop with xor
        acc = 0
        for t in range(bits):
            acc ^= int(x[s, t, 0])
            assert y[s, t] == acc
    assert 0.4 < x.mean() < 0.6
    x2, y2 = alg.prefix_sums(50, bits, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(alg.prefix_sums(50, bits, seed=4)[0], x)


def _bfs_path(open_, start, goal):
    """Shortest path on the open pixels (4-neighbours), by breadth-first search."""
    h, w = open_.shape
    prev = {start: None}
    queue = deque([start])
    while queue:
        cur = queue.popleft()
        if cur == goal:
            break
        r, c = cur
        for nxt in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nxt[0] < h and 0 <= nxt[1] < w and open_[nxt] and nxt not in prev:
                prev[nxt] = cur
                queue.append(nxt)
    out = np.zeros_like(open_, dtype=np.int32)
    cur = goal
    while cur is not None:
        out[cur] = 1
        cur = prev[cur]
    return out, prev


@pytest.mark.parametrize("size", [9, 13, 33])
def test_mazes_are_perfect_and_their_paths_match_breadth_first_search(size):
    x, y = alg.mazes(12, size, seed=1)
    assert x.shape == (12, size, size, 3) and y.shape == (12, size, size)
    cells = ((size + 1) // 2) ** 2
    for i in range(12):
        open_ = x[i, :, :, 0] > 0
        start = tuple(int(v) for v in np.argwhere(x[i, :, :, 1])[0])
        goal = tuple(int(v) for v in np.argwhere(x[i, :, :, 2])[0])
        assert x[i, :, :, 1].sum() == 1 and x[i, :, :, 2].sum() == 1 and start != goal
        assert start[0] % 2 == start[1] % 2 == 0 and goal[0] % 2 == goal[1] % 2 == 0
        # a perfect maze: every cell open, the open pixels a tree (connected, edges = nodes - 1)
        assert open_[::2, ::2].all()
        nodes = int(open_.sum())
        assert nodes == 2 * cells - 1
        edges = int((open_[1:, :] & open_[:-1, :]).sum() + (open_[:, 1:] & open_[:, :-1]).sum())
        assert edges == nodes - 1
        path, _ = _bfs_path(open_, start, goal)
        np.testing.assert_array_equal(y[i], path)
        assert not (y[i] & ~open_).any()
    x2, y2 = alg.mazes(12, size, seed=1)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(alg.mazes(12, size, seed=2)[0], x)


def test_maze_connectivity_scale_splits_and_exact_match():
    x, y = alg.mazes(3, 9, seed=0, scale=2)
    base_x, base_y = alg.mazes(3, 9, seed=0)
    assert x.shape == (3, 18, 18, 3)
    np.testing.assert_array_equal(x[:, ::2, ::2], base_x)
    np.testing.assert_array_equal(y[:, 1::2, 1::2], base_y)
    # connected: a BFS from a cell reaches every open pixel
    open_ = base_x[0, :, :, 0] > 0
    prev = {(0, 0)}
    queue = deque([(0, 0)])
    while queue:
        r, c = queue.popleft()
        for n in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= n[0] < 9 and 0 <= n[1] < 9 and open_[n] and n not in prev:
                prev.add(n)
                queue.append(n)
    assert len(prev) == open_.sum()
    splits = alg.prefix_sum_splits(train=20, test=5, test_bits=(48,), seed=0)
    assert sorted(splits) == ["test_32", "test_48", "train"]
    assert splits["test_48"][0].shape == (5, 48, 1)
    assert not np.array_equal(splits["train"][0][:5], splits["test_32"][0])
    m = alg.maze_splits(train=4, test=2, test_sizes=(13,))
    assert sorted(m) == ["test_13", "test_9", "train"] and m["test_13"][1].shape == (2, 13, 13)
    t = np.array([[0, 1, 1], [1, 1, 0]])
    assert alg.exact_match(np.array([[0, 1, 1], [1, 0, 0]]), t) == 0.5
    logits = np.stack([1 - t, t], -1).astype(np.float32)
    assert alg.exact_match(logits, t) == 1.0
    with pytest.raises(ValueError, match="size must be odd"):
        alg.mazes(2, 10)
    with pytest.raises(ValueError, match="bits must be an int >= 1"):
        alg.prefix_sums(2, 0)
    with pytest.raises(ValueError, match="do not match"):
        alg.exact_match(np.zeros((2, 3)), np.zeros((2, 4)))
