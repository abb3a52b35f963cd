"""Datasets as numpy arrays in [0, 1] (NHWC float32, int32 labels) and their ``tf.data`` pipelines.

Fashion-MNIST is read offline from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``), else from the Keras cache (``~/.keras/datasets/fashion-mnist``),
else through TFDS; a clear :class:`DataError` lists those places when none has it.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib

import numpy as np
import tensorflow as tf

from bcs_tf.errors import ConfigError, DataError

FASHION_MNIST_DIRS = (
    pathlib.Path("/usr/share/datasets/fashion-mnist"),
    pathlib.Path(os.path.expanduser("~/.keras/datasets/fashion-mnist")),
)
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train / validation / test arrays of one dataset, with its metadata."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str

    @property
    def input_shape(self):
        """Shape of one example (H, W, C)."""
        return tuple(self.x_train.shape[1:])


def read_idx(path):
    """Read a (gzipped) IDX file into a numpy array; raises DataError on a malformed file."""
    try:
        with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as fh:
            data = fh.read()
        magic = int.from_bytes(data[0:4], "big")
        ndim = magic & 0xFF
        if magic >> 8 != 0x08 or ndim == 0:
            raise ValueError(f"bad magic number {magic:#x}")
        dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(dims)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None


def _fashion_mnist_from_idx(directory):
    arrays = {key: read_idx(directory / fname) for key, fname in IDX_FILES.items()}
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def _fashion_mnist_from_tfds(data_dir):
    try:
        import tensorflow_datasets as tfds

        train, test = tfds.as_numpy(tfds.load("fashion_mnist", split=["train", "test"], batch_size=-1,
                                              as_supervised=True, data_dir=data_dir, download=True))
    except Exception as exc:  # TFDS raises many kinds (network, missing builder data, ...)
        raise DataError(f"TFDS could not provide fashion_mnist: {type(exc).__name__}: {exc}") from None
    return (train[0][..., 0], train[1]), (test[0][..., 0], test[1])


def load_fashion_mnist(data_dir=None, use_tfds=True):
    """Fashion-MNIST as ``((x_train, y_train), (x_test, y_test), source)`` with uint8 images (N, 28, 28)."""
    dirs = ([pathlib.Path(data_dir)] if data_dir else []) + list(FASHION_MNIST_DIRS)
    for directory in dirs:
        if all((directory / fname).is_file() for fname in IDX_FILES.values()):
            return (*_fashion_mnist_from_idx(directory), str(directory))
    tried = ", ".join(str(d) for d in dirs)
    if use_tfds:
        try:
            return (*_fashion_mnist_from_tfds(data_dir), "tfds")
        except DataError as exc:
            tfds_error = str(exc)
    else:
        tfds_error = "TFDS not tried"
    raise DataError(
        f"Fashion-MNIST not found. Looked for {', '.join(IDX_FILES.values())} in: {tried}; {tfds_error}. "
        "Install it with `apt-get install dataset-fashion-mnist` or pass --data-dir."
    )


def synthetic_arrays(n_train=1024, n_test=256, shape=(28, 28, 1), num_classes=10, seed=0):
    """A small learnable image task: each class is a fixed random template plus pixel noise."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0.0, 1.0, size=(num_classes,) + tuple(shape)).astype(np.float32)

    def sample(n):
        y = rng.integers(0, num_classes, size=n).astype(np.int32)
        x = np.clip(templates[y] + rng.normal(0.0, 0.35, size=(n,) + tuple(shape)), 0.0, 1.0)
        return x.astype(np.float32), y

    return sample(n_train), sample(n_test)


def split_validation(x, y, val_size, seed=0):
    """Hold out ``val_size`` examples (seeded permutation) of the training set for model selection."""
    if not 0 <= val_size < len(x):
        raise ConfigError(f"val-split must be in [0, {len(x)}). Received: val_split={val_size}")
    perm = np.random.default_rng(seed).permutation(len(x))
    val, train = perm[:val_size], perm[val_size:]
    return x[train], y[train], x[val], y[val]


def _to_float(x):
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return x[..., None] if x.ndim == 3 else x


def load_dataset(name, val_split=5000, seed=0, data_dir=None, synthetic_size=(1024, 256)):
    """Load dataset ``name`` (``fashion_mnist`` or ``synthetic``) with a held-out validation split."""
    if name == "fashion_mnist":
        (x_tr, y_tr), (x_te, y_te), source = load_fashion_mnist(data_dir)
        num_classes = 10
    elif name == "synthetic":
        (x_tr, y_tr), (x_te, y_te) = synthetic_arrays(*synthetic_size, seed=seed)
        source, num_classes = "synthetic", 10
    else:
        raise ConfigError(f"unknown dataset; choose one of {list(DATASETS)}. Received: dataset={name!r}")
    x_tr, x_te = _to_float(x_tr), _to_float(x_te)
    y_tr, y_te = y_tr.astype(np.int32), y_te.astype(np.int32)
    x_tr, y_tr, x_val, y_val = split_validation(x_tr, y_tr, val_split, seed)
    return Dataset(name, x_tr, y_tr, x_val, y_val, x_te, y_te, num_classes, source)


DATASETS = ("fashion_mnist", "synthetic")


def make_pipeline(x, y, batch_size, shuffle=False, seed=0, drop_remainder=False):
    """A ``tf.data`` pipeline over in-memory arrays (reshuffled each epoch when ``shuffle``)."""
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
