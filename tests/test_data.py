import gzip

import numpy as np
import pytest

from bcs_tf import data
from bcs_tf.errors import ConfigError, DataError


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_fmnist(directory, n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    for key, fname in data.IDX_FILES.items():
        n = n_train if "train" in key else n_test
        arr = rng.integers(0, 256, (n, 28, 28)) if key.startswith("x") else rng.integers(0, 10, n)
        _write_idx(directory / fname, arr)


def test_fashion_mnist_from_idx_directory(tmp_path):
    _fake_fmnist(tmp_path)
    ds = data.load_dataset("fashion_mnist", val_split=5, data_dir=str(tmp_path))
    assert ds.x_train.shape == (25, 28, 28, 1) and ds.x_val.shape == (5, 28, 28, 1)
    assert ds.x_test.shape == (10, 28, 28, 1) and ds.x_train.dtype == np.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 and ds.source == str(tmp_path)


def test_missing_dataset_names_the_places_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (tmp_path / "nowhere",))

    def no_tfds(data_dir):
        raise DataError("TFDS could not provide fashion_mnist: offline")

    monkeypatch.setattr(data, "_fashion_mnist_from_tfds", no_tfds)
    with pytest.raises(DataError) as err:
        data.load_dataset("fashion_mnist")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "TFDS" in message and "--data-dir" in message


def test_an_explicit_data_dir_is_the_only_place_looked(tmp_path, monkeypatch):
    # the default place has the files, but a --data-dir without them (a typo) is an error that names it
    _fake_fmnist(tmp_path)
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (tmp_path,))
    seen = []

    def no_tfds(data_dir):
        seen.append(data_dir)
        raise DataError("TFDS could not provide fashion_mnist: offline")

    monkeypatch.setattr(data, "_fashion_mnist_from_tfds", no_tfds)
    (tmp_path / "typo").mkdir()
    with pytest.raises(DataError) as err:
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "typo"))
    assert f"in: {tmp_path / 'typo'};" in str(err.value)  # that place alone
    assert seen == [str(tmp_path / "typo")]  # TFDS was asked for that data_dir
    assert data.load_dataset("fashion_mnist", val_split=5).source == str(tmp_path)


def test_corrupt_idx_file_is_a_data_error(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read IDX"):
        data.read_idx(bad)


def test_bad_val_split_and_unknown_dataset():
    with pytest.raises(ConfigError, match="val-split"):
        data.load_dataset("synthetic", val_split=10_000)
    with pytest.raises(ConfigError, match="dataset"):
        data.load_dataset("mnist3d")


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_a_data_dir_that_does_not_exist_is_refused_before_tfds(tmp_path, monkeypatch, name):
    import tensorflow_datasets as tfds

    def must_not_run(*args, **kwargs):
        raise AssertionError("TFDS was asked")

    monkeypatch.setattr(tfds, "load", must_not_run)
    with pytest.raises(DataError, match=f"--data-dir {tmp_path / 'typo'} is not a directory"):
        data.load_dataset(name, data_dir=str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()  # nothing created


def test_tfds_prepares_a_dataset_offline(tmp_path, monkeypatch):
    # TFDS's real download_and_prepare path (mock_data skips it); it broke once on a dependency TFDS imports
    # without declaring it (importlib_resources)
    from tiny_tfds import tiny_images

    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for s, n in (("train", 12), ("test", 6))}
    arrays.update(y_train=np.arange(12) % 3, y_test=np.arange(6) % 3)
    np.savez(tmp_path / "source.npz", **arrays)
    monkeypatch.setattr(tiny_images, "SOURCE", str(tmp_path / "source.npz"))
    (tmp_path / "tfds").mkdir()
    (x_tr, y_tr), (x_te, y_te), num_classes = data.load_tfds("bcs_tiny_images", data_dir=str(tmp_path / "tfds"))
    assert num_classes == 3
    order = np.argsort([x.tobytes() for x in x_tr])  # TFDS shuffles the records it writes
    expected = np.argsort([x.tobytes() for x in arrays["x_train"]])
    np.testing.assert_array_equal(x_tr[order], arrays["x_train"][expected])
    np.testing.assert_array_equal(y_tr[order], arrays["y_train"][expected])
    assert x_te.shape == (6, 8, 8, 3) and sorted(y_te.tolist()) == [0, 0, 1, 1, 2, 2]


@pytest.fixture
def mock_tfds():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100), ("svhn_cropped", 10)])
def test_tfds_datasets_load_through_tfds(mock_tfds, name, classes):
    ds = data.load_dataset(name, val_split=4)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_val.shape == (4, 32, 32, 3)
    assert ds.num_classes == classes and ds.source == f"tfds:{name}"
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_tfds_failure_is_a_clear_data_error(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(DataError, match="cifar10.*--data-dir"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))


def test_augmentation_shifts_and_flips_within_range_and_is_keyed():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 32, 32, 3)).astype("float32")
    key, other = tf.constant([1, 2], tf.int64), tf.constant([1, 3], tf.int64)
    out = data.augment_batch(tf.constant(x), key).numpy()
    assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0
    assert np.mean(np.abs(out - x)) > 0.01
    np.testing.assert_array_equal(out, data.augment_batch(tf.constant(x), key).numpy())  # same key, same draws
    assert np.any(out != data.augment_batch(tf.constant(x), other).numpy())
    # Without shifts every image is either untouched or exactly mirrored, and both happen.
    flips = data.augment_batch(tf.constant(x), key, max_shift=0.0).numpy()
    same = np.all(np.isclose(flips, x, atol=1e-6), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(flips, x[:, :, ::-1], atol=1e-6), axis=(1, 2, 3))
    assert np.all(same | mirrored) and same.any() and mirrored.any()
    np.testing.assert_allclose(data.augment_batch(tf.constant(x), key, flip=False, max_shift=0.0), x, atol=1e-6)
    # A shift of at most 10% of 32 pixels moves content by ≤ 3.2 pixels: a one-pixel-wide bright column
    # starting at column 16 ends up within columns 12..20.
    bar = np.zeros((64, 32, 32, 1), "float32")
    bar[:, :, 16] = 1.0
    moved = data.augment_batch(tf.constant(bar), key, flip=False).numpy()
    cols = np.flatnonzero(moved.max(axis=(0, 1, 3)) > 0.01)
    assert cols.min() >= 12 and cols.max() <= 20
    with pytest.raises(ConfigError, match="augment needs"):  # unkeyed draws would not survive a resume
        data.make_pipeline(x, np.zeros(64, "int32"), 16, shuffle=True, augment=data.augment_batch)
