import numpy as np
import pytest

from pae.data import ArraySource, WindowSource, iterate_batches, num_batches, split_indices
from pae.data.pipeline import epoch_order, normalize, random_crop_flip


def _source(n, rng):
    return ArraySource({"inputs": rng.normal(size=(n, 3)).astype(np.float32),
                        "targets": np.arange(n, dtype=np.int32)})


@pytest.mark.parametrize("n,batch,drop", [(37, 8, False), (37, 8, True), (40, 8, False), (8, 8, False)])
def test_epoch_visits_each_example_once_and_masks_padding(n, batch, drop):
    src = _source(n, np.random.default_rng(0))
    batches = list(iterate_batches(src, batch, seed=3, epoch=1, drop_remainder=drop))
    assert len(batches) == num_batches(n, batch, drop) == (n // batch if drop else -(-n // batch))
    assert all(b["inputs"].shape == (batch, 3) and b["mask"].shape == (batch,) for b in batches)
    seen = np.concatenate([b["targets"][b["mask"] == 1] for b in batches])
    expected = (n // batch) * batch if drop else n
    assert len(seen) == expected and len(np.unique(seen)) == expected
    if not drop and n % batch:
        assert batches[-1]["mask"].sum() == n % batch
    np.testing.assert_array_equal(seen, epoch_order(n, 3, 1)[:expected])


def test_order_depends_only_on_seed_and_epoch():
    a, b, c = epoch_order(100, 1, 2), epoch_order(100, 1, 2), epoch_order(100, 1, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(np.sort(a), np.arange(100))
    np.testing.assert_array_equal(epoch_order(10, 1, 2, shuffle=False), np.arange(10))


def test_process_shards_partition_the_global_batch():
    src = _source(50, np.random.default_rng(1))
    whole = list(iterate_batches(src, 16, seed=0, epoch=0))
    parts = [list(iterate_batches(src, 16, seed=0, epoch=0, process_index=p, process_count=4))
             for p in range(4)]
    for i, batch in enumerate(whole):
        merged = np.concatenate([parts[p][i]["targets"] for p in range(4)])
        np.testing.assert_array_equal(merged, batch["targets"])
        np.testing.assert_array_equal(np.concatenate([parts[p][i]["mask"] for p in range(4)]),
                                      batch["mask"])
    with pytest.raises(ValueError, match="divisible"):
        next(iterate_batches(src, 10, process_index=0, process_count=4))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(src, 0))
    for argument, bad, error in (("seed", -1, ValueError), ("epoch", -2, ValueError),
                                 ("seed", 1.5, TypeError), ("epoch", None, TypeError)):
        with pytest.raises(error, match=f"{argument} must be"):
            iterate_batches(src, 16, **{argument: bad})   # raised at the call, before any batch


def test_stratified_split_matches_class_proportions():
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=1000, p=[0.1, 0.2, 0.3, 0.4])
    train, val = split_indices(labels, 100, seed=5)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
    counts = np.bincount(labels, minlength=4)
    np.testing.assert_allclose(np.bincount(labels[val], minlength=4), 100 * counts / 1000, atol=1)
    np.testing.assert_array_equal(split_indices(labels, 100, seed=5)[1], val)
    assert not np.array_equal(split_indices(labels, 100, seed=6)[1], val)
    with pytest.raises(ValueError, match="val_size"):
        split_indices(labels, 1000, seed=0)


def test_random_crop_flip_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 7, 5, 3), dtype=np.uint8)
    out = random_crop_flip(images, np.random.default_rng(42), pad=2)
    # Reference: replay the same random draws and crop each image by hand.
    draw = np.random.default_rng(42)
    dy, dx, flips = draw.integers(0, 5, 6), draw.integers(0, 5, 6), draw.random(6) < 0.5
    for i in range(6):
        padded = np.zeros((11, 9, 3), np.uint8)
        padded[2:9, 2:7] = images[i]
        crop = padded[dy[i]:dy[i] + 7, dx[i]:dx[i] + 5]
        np.testing.assert_array_equal(out[i], crop[:, ::-1] if flips[i] else crop)


def test_normalize_per_channel():
    images = np.random.default_rng(0).integers(0, 256, size=(4, 2, 2, 3), dtype=np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    out = normalize(images, mean, std)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], (images[..., c] / 255.0 - mean[c]) / std[c], rtol=1e-6)
    assert out.dtype == np.float32


def test_window_source_shifts_targets():
    tokens = np.arange(23, dtype=np.int32)
    src = WindowSource(tokens, seq_len=5)
    assert len(src) == 4
    batch = src.take(np.array([2, 0]))
    np.testing.assert_array_equal(batch["inputs"][0], np.arange(10, 15))
    np.testing.assert_array_equal(batch["targets"][0], np.arange(11, 16))
    np.testing.assert_array_equal(batch["targets"][1], np.arange(1, 6))
    with pytest.raises(ValueError, match="seq_len"):
        WindowSource(tokens, seq_len=23)
    for bad in (2.5, "4", True):
        with pytest.raises(TypeError, match="seq_len must be an int"):
            WindowSource(tokens, seq_len=bad)


def test_augmentation_draws_differ_across_processes():
    # every image identical (and every pixel distinct), so two outputs are equal iff their crop
    # offsets and flips are: row j of each process must not share one draw
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(1, 8, 8, 3)
    src = ArraySource({"inputs": np.repeat(image, 32, 0), "targets": np.arange(32)})
    crop = lambda batch, rng: {**batch, "inputs": random_crop_flip(batch["inputs"], rng, pad=2)}  # noqa: E731
    parts = [next(iterate_batches(src, 32, seed=1, epoch=0, augment=crop, process_index=p,
                                  process_count=4))["inputs"] for p in range(4)]
    shared = [all(np.array_equal(parts[0][j], parts[p][j]) for p in range(1, 4)) for j in range(8)]
    assert not any(shared)
    # one process: the stream of (seed, epoch, 1 + batch index), as before
    whole = next(iterate_batches(src, 32, seed=1, epoch=0, augment=crop))["inputs"]
    np.testing.assert_array_equal(whole, random_crop_flip(src.arrays["inputs"][epoch_order(32, 1, 0)],
                                                          np.random.default_rng([1, 0, 1]), pad=2))


def test_split_indices_argument_types():
    # a NumPy integer count works like a Python int
    for n in (10, np.int64(10)):
        train, val = split_indices(n, 3, seed=2)
        assert len(val) == 3 and sorted(np.concatenate([train, val])) == list(range(10))
    np.testing.assert_array_equal(split_indices(np.int64(10), 3, seed=2)[1], split_indices(10, 3, seed=2)[1])
    for labels in (10, np.arange(10) % 2):
        with pytest.raises(TypeError, match="val_size"):
            split_indices(labels, 3.0, seed=0)


@pytest.mark.parametrize("seed, error, says", [(None, TypeError, "seed must be an int, got seed=None"),
                                               (1.5, TypeError, "seed must be an int, got seed=1.5"),
                                               (-1, ValueError, "seed must be >= 0, got seed=-1")])
def test_split_indices_refuses_a_seed_that_is_not_an_int_ge_0(seed, error, says):
    """None gave another validation split on every call; 1.5 and -1 failed inside NumPy."""
    for labels in (100, np.arange(100) % 10):
        with pytest.raises(error, match=says):
            split_indices(labels, 10, seed)
