"""Data: named data sets (tfds and embedded), random-access sources and a deterministic pipeline."""
from pae.data.algorithmic import exact_match, maze_splits, mazes, prefix_sum_splits, prefix_sums
from pae.data.datasets import (EMBEDDED, NAMES, TFDS, Dataset, DatasetNotFoundError,
                               load_dataset)
from pae.data.pipeline import (check_batch_size, epoch_order, image_transform, iterate_batches,
                               normalize, num_batches, random_crop_flip, split_indices)
from pae.data.sources import ArraySource, RecordSource, WindowSource

__all__ = [
    "ArraySource", "Dataset", "DatasetNotFoundError", "EMBEDDED", "NAMES", "RecordSource", "TFDS",
    "WindowSource", "check_batch_size", "epoch_order", "image_transform", "iterate_batches",
    "load_dataset", "normalize", "num_batches", "random_crop_flip", "split_indices",
    "exact_match", "maze_splits", "mazes", "prefix_sum_splits", "prefix_sums",
]
