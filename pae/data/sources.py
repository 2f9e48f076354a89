"""Random-access example sources: the one interface the input pipeline reads from.

A *source* is anything with ``len(source)`` and ``source.take(indices, rng)`` returning a dict of
NumPy arrays stacked along a leading batch axis. Three kinds cover every data set here:

* :class:`ArraySource`: examples held in memory (MNIST, CIFAR, the embedded data sets);
* :class:`RecordSource`: examples read one by one from a ``tfds.data_source`` (array-record random
  access, no TensorFlow) and decoded on the fly (ImageNet, whose images differ in size);
* :class:`WindowSource`: fixed-length windows over one long token array (character language models).

Every example dict uses the keys ``"inputs"`` and ``"targets"``, so one train step serves images and text.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

Example = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Examples held in memory as equally long arrays (``inputs``, ``targets``, ...)."""

    arrays: Mapping[str, np.ndarray]

    def __post_init__(self):
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays: all arrays need the same length, got {lengths}")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, indices: np.ndarray, rng: np.random.Generator | None = None) -> Example:
        del rng
        return {k: v[indices] for k, v in self.arrays.items()}

    def subset(self, indices: np.ndarray) -> "ArraySource":
        return ArraySource({k: v[indices] for k, v in self.arrays.items()})


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """Examples read lazily from a random-access record source and decoded one at a time.

    ``decode(record, rng) -> dict`` turns one tfds record into arrays of a fixed shape (for ImageNet:
    crop and resize). ``indices`` restricts the source to a subset (e.g. a validation split).
    """

    records: Any
    decode: Callable[[Mapping[str, Any], np.random.Generator | None], Example]
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records) if self.indices is None else len(self.indices)

    def take(self, indices: np.ndarray, rng: np.random.Generator | None = None) -> Example:
        rows = indices if self.indices is None else self.indices[indices]
        examples = [self.decode(self.records[int(i)], rng) for i in rows]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def subset(self, indices: np.ndarray) -> "RecordSource":
        base = np.arange(len(self.records)) if self.indices is None else self.indices
        return dataclasses.replace(self, indices=base[indices])


@dataclasses.dataclass(frozen=True)
class WindowSource:
    """Non-overlapping windows of ``seq_len + 1`` tokens: ``inputs = w[:-1]``, ``targets = w[1:]``."""

    tokens: np.ndarray
    seq_len: int

    def __post_init__(self):
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, (int, np.integer)):
            raise TypeError(f"seq_len must be an int, got {self.seq_len!r}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(
                f"seq_len={self.seq_len} is too long for a text of {len(self.tokens)} tokens")

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def take(self, indices: np.ndarray, rng: np.random.Generator | None = None) -> Example:
        del rng
        starts = np.asarray(indices)[:, None] * self.seq_len
        window = self.tokens[starts + np.arange(self.seq_len + 1)]
        return {"inputs": window[:, :-1], "targets": window[:, 1:]}

    def subset(self, indices: np.ndarray) -> "ArraySource":
        return ArraySource(self.take(np.asarray(indices)))


Source = ArraySource | RecordSource | WindowSource
