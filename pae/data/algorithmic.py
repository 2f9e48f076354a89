"""Algorithmic data sets generated in the repository, deterministic by seed: prefix-sum parity and mazes.

The easy-to-hard extrapolation tasks of Schwarzschild et al. / Bansal et al. (DeepThinking, arXiv
2106.04537, 2202.05826), used by soft sharing's recurrence experiments (Savarese & Maire, arXiv
1902.09701): train on small instances, test on larger ones. Written here from their definitions (the
public data packages download at run time); NumPy only.

* Prefix sums: ``x`` uniform random bits, ``y_t = (x_1 + ... + x_t) mod 2``. Inputs ``[N, L, 1]``
  float32 (channels last, for a 1-D conv), targets ``[N, L]`` int32.
* Mazes: a perfect maze (recursive backtracker: a random spanning tree of the cell grid) of
  ``size x size`` pixels, ``size`` odd; cell ``(r, c)`` is pixel ``(2r, 2c)`` and a carved passage
  opens the pixel between two cells, so "9x9" has 5x5 cells. Inputs ``[N, H, W, 3]`` float32:
  channel 0 open pixels, 1 the start, 2 the goal; targets ``[N, H, W]`` int32, 1 on the unique
  start-to-goal path (cells and passages, both ends included). ``scale`` upsamples every pixel to
  ``scale x scale`` (DeepThinking draws its mazes with 2).

The generator finds the path through the carving tree (both ends up to their common ancestor); tests
check it against an independent breadth-first search on the pixels.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

#: separates the streams of the generators (and of each size) under one user seed
_PREFIX, _MAZE = 0x5E11, 0x3A2E


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def prefix_sums(count: int, bits: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random ``bits``-bit strings and their prefix parities (see the module doc).

    Deterministic in ``(seed, bits)``: strings of different lengths come from different streams.
    """
    count, bits = _check_int("count", count, 1), _check_int("bits", bits, 1)
    rng = np.random.default_rng([_PREFIX, _check_int("seed", seed, 0), bits])
    x = rng.integers(0, 2, size=(count, bits), dtype=np.int32)
    y = np.cumsum(x, axis=1) % 2
    return x[..., None].astype(np.float32), y.astype(np.int32)


def _maze(rng: np.random.Generator, cells: int) -> tuple[np.ndarray, tuple, tuple, np.ndarray]:
    """One maze: (open pixels, start cell, goal cell, path pixels)."""
    n = 2 * cells - 1
    grid = np.zeros((n, n), np.int8)
    parent = {}
    root = (int(rng.integers(cells)), int(rng.integers(cells)))
    parent[root] = None
    grid[2 * root[0], 2 * root[1]] = 1
    stack = [root]
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                   if 0 <= r + dr < cells and 0 <= c + dc < cells and (r + dr, c + dc) not in parent]
        if not options:
            stack.pop()
            continue
        nxt = options[int(rng.integers(len(options)))]
        parent[nxt] = (r, c)
        grid[2 * nxt[0], 2 * nxt[1]] = 1
        grid[r + nxt[0], c + nxt[1]] = 1          # the passage pixel between the two cells
        stack.append(nxt)
    flat = rng.choice(cells * cells, size=2, replace=False)
    start, goal = divmod(int(flat[0]), cells), divmod(int(flat[1]), cells)

    def ancestors(cell):
        out = []
        while cell is not None:
            out.append(cell)
            cell = parent[cell]
        return out

    up_s, up_g = ancestors(start), ancestors(goal)
    common = set(up_s) & set(up_g)
    lca = next(c for c in up_s if c in common)
    route = up_s[:up_s.index(lca) + 1] + up_g[:up_g.index(lca)][::-1]
    path = np.zeros((n, n), np.int8)
    for (r0, c0), (r1, c1) in zip(route, route[1:]):
        path[2 * r0, 2 * c0] = path[r0 + r1, c0 + c1] = 1
    path[2 * route[-1][0], 2 * route[-1][1]] = 1
    return grid, start, goal, path


def mazes(count: int, size: int, seed: int = 0, scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``count`` perfect mazes of ``size x size`` pixels (``size`` odd >= 3) and their solution paths
    (see the module doc). Deterministic in ``(seed, size)``."""
    count = _check_int("count", count, 1)
    size = _check_int("size", size, 3)
    scale = _check_int("scale", scale, 1)
    if size % 2 == 0:
        raise ValueError(f"size must be odd (cells at even pixels, walls between), got {size}")
    rng = np.random.default_rng([_MAZE, _check_int("seed", seed, 0), size])
    x = np.zeros((count, size, size, 3), np.float32)
    y = np.zeros((count, size, size), np.int32)
    for i in range(count):
        grid, start, goal, path = _maze(rng, (size + 1) // 2)
        x[i, :, :, 0] = grid
        x[i, 2 * start[0], 2 * start[1], 1] = 1.0
        x[i, 2 * goal[0], 2 * goal[1], 2] = 1.0
        y[i] = path
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
        y = y.repeat(scale, axis=1).repeat(scale, axis=2)
    return x, y


def prefix_sum_splits(train: int = 10_000, test: int = 1_000, train_bits: int = 32,
                      test_bits: Sequence[int] = (48, 128, 512), seed: int = 0) -> dict:
    """``{"train": (x, y), "test_32": ..., "test_48": ..., ...}`` for :func:`pae.train.make_task`
    (each test length its own evaluation split; the in-distribution test set is fresh strings)."""
    out = {"train": prefix_sums(train, train_bits, seed)}
    for bits in (train_bits, *test_bits):
        out[f"test_{bits}"] = prefix_sums(test, bits, seed + 1)
    return out


def maze_splits(train: int = 10_000, test: int = 500, train_size: int = 9,
                test_sizes: Sequence[int] = (13, 33), seed: int = 0, scale: int = 1) -> dict:
    """``{"train": (x, y), "test_9": ..., "test_13": ..., ...}`` of mazes, as :func:`prefix_sum_splits`."""
    out = {"train": mazes(train, train_size, seed, scale)}
    for size in (train_size, *test_sizes):
        out[f"test_{size}"] = mazes(test, size, seed + 1, scale)
    return out


def exact_match(predictions, targets) -> float:
    """Fraction of examples whose every position is right (whole string / whole path):
    ``predictions`` are labels ``[N, ...]`` or logits ``[N, ..., C]`` (argmax taken)."""
    p, t = np.asarray(predictions), np.asarray(targets)
    if p.ndim == t.ndim + 1:
        p = p.argmax(-1)
    if p.shape != t.shape:
        raise ValueError(f"predictions of shape {p.shape} do not match targets of shape {t.shape}")
    return float(np.mean(np.all((p == t).reshape(len(t), -1), axis=1)))


__all__ = ["exact_match", "maze_splits", "mazes", "prefix_sum_splits", "prefix_sums"]
