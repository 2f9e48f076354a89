import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pae.data import DatasetNotFoundError, load_dataset


def test_digits_are_sklearns_digits_rescaled():
    from sklearn.datasets import load_digits

    ds = load_digits()
    data = load_dataset("digits")
    assert (len(data["train"]), len(data["test"])) == (1437, 360)
    assert data.input_shape == (8, 8, 1) and data.num_classes == 10 and data.kind == "image"
    train = data["train"].arrays
    assert train["inputs"].dtype == np.uint8 and train["inputs"].max() == 255
    # every embedded image is one of sklearn's, rescaled 0..16 -> 0..255, with its own label
    raw = {tuple(np.round(img * 255 / 16).astype(np.uint8).ravel()): t
           for img, t in zip(ds.images, ds.target)}
    for img, t in zip(train["inputs"][:50], train["targets"][:50]):
        assert raw[tuple(img.ravel())] == t
    # the test split does not move with the run's seed
    np.testing.assert_array_equal(load_dataset("digits", seed=7)["test"].arrays["targets"],
                                  data["test"].arrays["targets"])


def test_example_inputs_is_the_first_train_image_normalized():
    data = load_dataset("digits")
    got = data.example_inputs()
    raw = data["train"].arrays["inputs"][:1].astype(np.float64) / 255.0
    want = (raw - np.asarray(data.mean)) / np.asarray(data.std)  # independent reference
    assert got.shape == (1, 8, 8, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mnist_subset_is_real_mnist_with_validation_split():
    data = load_dataset("mnist_subset", val_size=500, seed=1)
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 3500, "validation": 500, "test": 1000}
    assert data.input_shape == (28, 28, 1)
    val_counts = np.bincount(data["validation"].arrays["targets"], minlength=10)
    assert val_counts.min() >= 40 and val_counts.max() <= 60  # ~class-balanced
    assert 0.1 < data.mean[0] < 0.15  # MNIST's mean intensity is ~0.13


@pytest.mark.parametrize("name", ["digits", "mnist_subset"])
def test_embedded_normalization_comes_from_the_training_examples_only(name):
    """With a validation split carved out, mean and std are those of the examples left to train on
    (NumPy over them), not of train + validation."""
    whole, split = load_dataset(name), load_dataset(name, val_size=200, seed=3)
    for data in (whole, split):
        x = data["train"].arrays["inputs"].astype(np.float64) / 255.0
        np.testing.assert_allclose(data.mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
        np.testing.assert_allclose(data.std, x.std(axis=(0, 1, 2)), rtol=1e-5)
    assert split.mean != whole.mean


def test_pydoc_topics_round_trip():
    data = load_dataset("pydoc_topics", seq_len=64)
    assert data.kind == "text" and data.num_classes == len(data.vocab)
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    window = data["train"].take(np.array([3]))
    decoded = "".join(data.vocab[i] for i in window["inputs"][0])
    assert decoded == text[3 * 64:4 * 64]
    assert sum(len(s) for s in data.splits.values()) * 64 > 0.99 * len(text) - 3 * 64


def test_local_text_file(tmp_path):
    path = tmp_path / "ptb.char.train.txt"
    path.write_text("a b c _ d e f\n" * 50)
    data = load_dataset(f"text:{path}", seq_len=8)
    assert data.vocab == "\n _abcdef"
    assert len(data["train"]) > 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(f"text:{tmp_path / 'missing.txt'}")


def test_an_empty_or_too_short_text_file_is_refused_saying_why(tmp_path):
    """An empty file failed in max(); a split shorter than one window named no split."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"text file '{re.escape(str(empty))}' is empty"):
        load_dataset(f"text:{empty}")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world, this is a tiny text file for testing.\n")     # 51 characters
    with pytest.raises(ValueError, match=r"split 'validation' has 3 characters of the 51 cut 90/5/5, "
                                         r"fewer than one window of seq_len \+ 1 = 17"):
        load_dataset(f"text:{tiny}", seq_len=16)
    assert len(load_dataset(f"text:{tiny}", seq_len=2)["validation"]) == 1   # 3 characters: one window
    with pytest.raises(TypeError, match="seq_len must be an int"):
        load_dataset(f"text:{tiny}", seq_len=2.0)


@pytest.mark.parametrize("seed, error", [(None, TypeError), (1.5, TypeError), ("0", TypeError),
                                         (-1, ValueError)])
def test_load_dataset_refuses_a_seed_that_is_not_an_int_ge_0(seed, error):
    """seed=None drew the validation split from OS entropy: another split on every load."""
    with pytest.raises(error, match="seed must be"):
        load_dataset("digits", val_size=100, seed=seed)


def test_the_validation_split_is_a_function_of_the_seed():
    a, b = (load_dataset("digits", val_size=100, seed=np.int64(3))["validation"].arrays["targets"]
            for _ in range(2))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,shape,classes", [("mnist", (28, 28, 1), 10),
                                                ("cifar10", (32, 32, 3), 10),
                                                ("cifar100", (32, 32, 3), 100)])
def test_tfds_image_sets_through_mock_data(name, shape, classes):
    with tfds.testing.mock_data(num_examples=24):
        data = load_dataset(name, val_size=4)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 20, "validation": 4, "test": 24}
    assert data.input_shape == shape and data.num_classes == classes
    assert data["train"].arrays["targets"].max() < classes
    assert data.augment == name.startswith("cifar")


def test_imagenet_decodes_fixed_size_crops():
    with tfds.testing.mock_data(num_examples=6):
        data = load_dataset("imagenet2012")
        train = data["train"].take(np.array([0, 3]), np.random.default_rng(0))
        test = data["test"].take(np.array([1, 2]))
    assert train["inputs"].shape == (2, 224, 224, 3) and train["inputs"].dtype == np.uint8
    assert test["inputs"].shape == (2, 224, 224, 3) and data.num_classes == 1000


def test_tiny_shakespeare_uses_its_own_splits():
    with tfds.testing.mock_data(num_examples=1):
        data = load_dataset("tiny_shakespeare", seq_len=4)
    assert set(data.splits) == {"train", "validation", "test"} and data.kind == "text"


def test_missing_and_unknown_datasets_fail_clearly(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="tfds build cifar10"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    # a pathlib.Path data_dir (not only a str) gets the same message
    with pytest.raises(DatasetNotFoundError, match="tfds build mnist.*--data_dir=" + re.escape(str(tmp_path))):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'.*digits"):
        load_dataset("cifar11")
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", val_size=-1)


def test_val_size_must_be_an_int():
    with pytest.raises(TypeError, match="val_size"):
        load_dataset("digits", val_size=100.0)
    with pytest.raises(TypeError, match="val_size"):
        load_dataset("digits", val_size="100")
