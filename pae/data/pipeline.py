"""The input pipeline: deterministic shuffling, explicit partial batches, augmentation, splits, sharding.

Everything is a pure function of ``(seed, epoch)``, so an interrupted run that resumes at epoch ``e``
sees exactly the batches the uninterrupted run saw.

The last partial batch is *padded* to the full batch size and marked with ``mask`` (1 for real
examples, 0 for padding): the jitted step keeps one shape (no recompilation) and metrics weighted by
``mask`` stay exact. Pass ``drop_remainder=True`` to drop it instead. Models take the mask as
``model.apply(..., mask=batch["mask"])`` so that padding rows stay out of BatchNorm statistics.

A batch larger than its split is refused: :func:`iterate_batches` and :func:`num_batches` raise a
``ValueError`` (naming the argument, its value and the split's size) when called, before any batch
is built, since padding 4,000 examples to a batch of 100,000 rows only allocates memory. For
evaluation, where one batch covering a small split is reasonable, ``clamp=True`` opts in to
shrinking the batch to the split's size instead (rounded up to a multiple of ``process_count``).
Training batches are never clamped silently: a changed batch size changes the optimization.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np

from pae.data.sources import Example, Source

Augment = Callable[[Example, np.random.Generator], Example]


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """An independent NumPy generator for ``(seed, epoch, stream)``."""
    return np.random.default_rng([seed, epoch, stream])


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the examples: a seeded permutation, or ``arange``."""
    if not shuffle:
        return np.arange(num_examples)
    return epoch_rng(seed, epoch).permutation(num_examples)


def check_batch_size(batch_size: int, num_examples: int, *, argument: str = "batch_size",
                     split: str | None = None) -> None:
    """Raise unless ``1 <= batch_size <= num_examples`` (TypeError for a non-integer).

    Call it where a batch size is chosen (e.g. when a run is configured) to fail before anything is
    allocated; ``argument`` and ``split`` name the setting and the split in the message.
    """
    _check_positive_int(batch_size, argument)
    if batch_size > num_examples:
        where = f"the {split!r} split" if split else "the split"
        raise ValueError(
            f"{argument}={batch_size} is larger than {where}, which has {num_examples} examples; "
            f"use {argument} <= {num_examples}")


def check_int(argument: str, value) -> None:
    """TypeError naming ``argument`` unless ``value`` is an int (a NumPy integer; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argument} must be an int, got {argument}={value!r}")


def check_seed(seed, argument: str = "seed") -> None:
    """TypeError unless ``seed`` is an int (None would draw from OS entropy: a different split on
    every call); ValueError when negative."""
    check_int(argument, seed)
    if seed < 0:
        raise ValueError(f"{argument} must be >= 0, got {argument}={seed}")


def _check_positive_int(batch_size, argument: str = "batch_size") -> None:
    check_int(argument, batch_size)
    if batch_size < 1:
        raise ValueError(f"{argument} must be >= 1, got {argument}={batch_size}")


def _clamped(batch_size: int, num_examples: int, multiple: int) -> int:
    """``batch_size``, or the split's size rounded up to a multiple of ``multiple`` if smaller."""
    return min(batch_size, math.ceil(num_examples / multiple) * multiple)


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = False, *,
                clamp: bool = False, split: str | None = None) -> int:
    """Batches per epoch: ``floor(n / B)`` when dropping the remainder, else ``ceil(n / B)``.

    Raises ValueError when ``batch_size > num_examples`` unless ``clamp`` (then 1: see
    :func:`iterate_batches`); ``split`` names the split in the message.
    """
    if clamp:
        _check_clamp(drop_remainder)
        _check_positive_int(batch_size)
        batch_size = min(batch_size, max(num_examples, 1))
    check_batch_size(batch_size, num_examples, split=split)
    return num_examples // batch_size if drop_remainder else math.ceil(num_examples / batch_size)


def _check_clamp(drop_remainder: bool) -> None:
    if drop_remainder:
        raise ValueError("clamp=True (for evaluation) cannot be combined with drop_remainder=True")


def iterate_batches(
    source: Source,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = False,
    augment: Augment | None = None,
    process_index: int = 0,
    process_count: int = 1,
    clamp: bool = False,
    clamp_multiple: int = 1,
    split: str | None = None,
) -> Iterator[Example]:
    """Yield this process's share of each global batch of one epoch.

    ``batch_size`` is the *global* batch size; process ``p`` of ``P`` gets rows ``[p*B/P, (p+1)*B/P)``
    of every global batch (so ``B`` must divide by ``P``). Each batch has ``inputs``, ``targets`` and a
    float32 ``mask``. Per-example decoding and augmentation draw in turn from one generator seeded by
    ``(seed, epoch, batch index, process index)``, so their random choices are independent, within a
    process and across processes (one process: the stream of ``(seed, epoch, batch index)``).

    Arguments are checked when this is called, before any batch is built: ``batch_size`` larger
    than ``len(source)`` raises ValueError (naming ``split`` if given), unless ``clamp=True``, which
    uses ``min(batch_size, ceil(n / m) * m)`` rows instead, ``m`` the least common multiple of ``P``
    and ``clamp_multiple`` (for evaluation; not with ``drop_remainder``; pass the number of devices
    the batch is sharded over as ``clamp_multiple``, the padding rows have mask 0).
    """
    n = len(source)
    if n == 0:
        raise ValueError(f"source is empty{f' (split {split!r})' if split else ''}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    for argument, value in (("seed", seed), ("epoch", epoch)):
        check_int(argument, value)
        if value < 0:
            raise ValueError(f"{argument} must be >= 0, got {argument}={value}")
    if clamp:
        _check_clamp(drop_remainder)
        _check_positive_int(batch_size)
        _check_positive_int(clamp_multiple, "clamp_multiple")
        batch_size = _clamped(batch_size, n, math.lcm(process_count, clamp_multiple))
    else:
        check_batch_size(batch_size, n, split=split)
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the number of processes ({process_count})")
    return _batches(source, batch_size, seed, epoch, shuffle, drop_remainder, augment,
                    process_index, process_count)


def _batches(source, batch_size, seed, epoch, shuffle, drop_remainder, augment, process_index,
             process_count) -> Iterator[Example]:
    n = len(source)
    order = epoch_order(n, seed, epoch, shuffle)
    local = batch_size // process_count
    for b in range(math.ceil(n / batch_size) if not drop_remainder else n // batch_size):
        rows = order[b * batch_size:(b + 1) * batch_size]
        mask = np.zeros(batch_size, np.float32)
        mask[:len(rows)] = 1.0
        rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
        mine = slice(process_index * local, (process_index + 1) * local)
        # one generator per (batch, process): decode draws first, then augmentation; processes get
        # distinct streams (the same one would give row j of every process the same crop and flip)
        rng = epoch_rng(seed, epoch, 1 + b * process_count + process_index)
        batch = source.take(rows[mine], rng)
        if augment is not None:
            batch = augment(batch, rng)
        batch["mask"] = mask[mine]
        yield batch


def split_indices(labels: np.ndarray | int, val_size: int, seed: int,
                  stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, validation) index arrays, class-balanced when ``stratify``.

    With stratification, each class contributes ``round(val_size * n_c / n)`` examples (largest
    remainders fill up to exactly ``val_size``), as in the 45k/5k CIFAR protocol.
    """
    count = np.ndim(labels) == 0   # a number of examples rather than their labels
    n = int(labels) if count else len(labels)
    check_int("val_size", val_size)
    check_seed(seed)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    rng = np.random.default_rng(seed)
    if count or not stratify:
        perm = rng.permutation(n)
        return np.sort(perm[val_size:]), np.sort(perm[:val_size])
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = val_size * counts / n
    take = np.floor(quota).astype(int)
    extra = val_size - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    val = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)])
    train_mask = np.ones(n, bool)
    train_mask[val] = False
    return np.flatnonzero(train_mask), np.sort(val)


# ----------------------------------------------------------------------------- image augmentation

def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x / 255 - mean) / std`` per channel, as float32 (uint8 NHWC in)."""
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4,
                     flip: bool = True) -> np.ndarray:
    """Standard CIFAR augmentation: zero-pad by ``pad``, random crop back to size, random h-flip."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    if flip:
        flipped = rng.random(n) < 0.5
        cols = np.where(flipped[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def image_transform(mean, std, augment: bool, pad: int = 4, flip: bool = True) -> Augment:
    """Batch transform for uint8 images: optional crop+flip, then per-channel normalization."""

    def transform(batch: Example, rng: np.random.Generator) -> Example:
        images = batch["inputs"]
        if augment:
            images = random_crop_flip(images, rng, pad=pad, flip=flip)
        return {**batch, "inputs": normalize(images, mean, std)}

    return transform
