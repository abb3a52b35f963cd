"""Datasets as numpy arrays in [0, 1] (NHWC float32, int32 labels) and their ``tf.data`` pipelines.

Fashion-MNIST is read offline from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``), else from the Keras cache (``~/.keras/datasets/fashion-mnist``),
else through TFDS; a clear :class:`DataError` lists those places when none has it. An explicit ``--data-dir``
is the only place looked (its IDX files, else TFDS with it as data_dir): a wrong path is an error, never a
silent fall-back to another copy, and a directory that does not exist is refused before TFDS would create it and
try to download into it (offline, a typo would otherwise cost minutes of TFDS's retries). CIFAR-10/100 and SVHN
come through TFDS (``--data-dir`` is its data_dir).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pathlib
import zipfile

import numpy as np
import tensorflow as tf

from bcs_tf.errors import ConfigError, DataError, check_fraction

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
    """Fashion-MNIST as ``((x_train, y_train), (x_test, y_test), source)`` with uint8 images (N, 28, 28); from
    ``data_dir`` alone when it is given (see the module docstring)."""
    dirs = [pathlib.Path(data_dir)] if data_dir else list(FASHION_MNIST_DIRS)
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


def load_tfds(name, data_dir=None):
    """``((x_train, y_train), (x_test, y_test), num_classes)`` of a TFDS image dataset as uint8 arrays."""
    try:
        import tensorflow_datasets as tfds

        splits, info = tfds.load(name, split=["train", "test"], as_supervised=True, with_info=True,
                                 data_dir=data_dir, download=True)
        arrays = []
        for split in splits:  # batched iteration: batch_size=-1 crashes under tfds.testing.mock_data
            xs, ys = zip(*tfds.as_numpy(split.batch(4096)))
            arrays.append((np.concatenate(xs), np.concatenate(ys)))
        num_classes = info.features["label"].num_classes
    except Exception as exc:  # TFDS raises network, checksum and missing-data errors of many types
        where = f"data_dir={data_dir}" if data_dir else "the default TFDS data_dir (~/tensorflow_datasets)"
        raise DataError(
            f"TFDS could not load {name} from {where}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}. "
            f"Prepare it once with internet access (`tfds build {name}`) or pass --data-dir to a prepared copy."
        ) from None
    return arrays[0], arrays[1], num_classes


def load_dataset(name, val_split=5000, seed=0, data_dir=None, synthetic_size=(1024, 256)):
    """Load dataset ``name`` (see :data:`DATASETS`) with a held-out validation split."""
    if data_dir and name != "synthetic" and not pathlib.Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} is not a directory (create it first to let TFDS download "
                        f"{name} there)")
    if name == "fashion_mnist":
        (x_tr, y_tr), (x_te, y_te), source = load_fashion_mnist(data_dir)
        num_classes = 10
    elif name in TFDS_DATASETS:
        (x_tr, y_tr), (x_te, y_te), num_classes = load_tfds(name, data_dir)
        source = f"tfds:{name}"
    elif name == "synthetic":
        (x_tr, y_tr), (x_te, y_te) = synthetic_arrays(*synthetic_size, seed=seed)
        source, num_classes = "synthetic", 10
    else:
        raise ConfigError(f"unknown dataset; choose one of {list(DATASETS)}. Received: dataset={name!r}")
    x_tr, x_te = _to_float(x_tr), _to_float(x_te)
    y_tr, y_te = y_tr.astype(np.int32), y_te.astype(np.int32)
    x_tr, y_tr, x_val, y_val = split_validation(x_tr, y_tr, val_split, seed)
    return Dataset(name, x_tr, y_tr, x_val, y_val, x_te, y_te, num_classes, source)


TFDS_DATASETS = ("cifar10", "cifar100", "svhn_cropped")
DATASETS = ("fashion_mnist", *TFDS_DATASETS, "synthetic")


def labelled_split(x, y, fraction):
    """``(labelled, unlabelled)`` parts of a (validation-split, already shuffled) training set.

    The first ``fraction`` keeps its labels; the rest is the unlabelled pool of the semi-supervised setting.
    """
    check_fraction(fraction, "labelled_fraction")
    n = max(1, int(round(fraction * len(x))))
    return (x[:n], y[:n]), (x[n:], y[n:])


def read_npz(path, names, what):
    """Arrays ``names`` of the ``.npz`` file ``path``; DataError naming ``what`` (e.g. "extra data") when it is
    not an .npz holding them."""
    need = f"need an .npz with arrays {', '.join(names)}"
    try:
        if not pathlib.Path(path).is_file():
            raise ValueError("no such file")
        if not zipfile.is_zipfile(path):  # else numpy returns a lone .npy's array or tries the file as a pickle
            raise ValueError("not an .npz (zip) file")
        with np.load(path) as f:
            return [f[name] for name in names]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DataError(f"cannot read {what} {path} ({need}): {exc}") from None


def load_extra_data(path, input_shape=None, num_classes=None):
    """Pseudo-labelled extra data ``(x, y)`` from an ``.npz`` with arrays ``x`` (NHWC in [0, 1]) and ``y``,
    checked against the dataset's ``input_shape`` and ``num_classes`` when given."""
    x, y = read_npz(path, ("x", "y"), "extra data")
    x, y = x.astype(np.float32), y.astype(np.int32)
    if len(x) != len(y) or x.ndim != 4 or not len(x):
        raise DataError(f"extra data {path}: x must be (N, H, W, C) and y (N,); got {x.shape} and {y.shape}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"extra data {path}: images of shape {x.shape[1:]}, the dataset's are {tuple(input_shape)}")
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"extra data {path}: labels in [{y.min()}, {y.max()}], the dataset has classes "
                        f"0–{num_classes - 1}")
    return x, y


def extra_per_batch(batch_size, extra_fraction):
    """Number of extra (pseudo-labelled) examples in each mixed batch of ``batch_size``."""
    if not 0.0 < extra_fraction < 1.0:
        raise ConfigError(f"extra fraction must be in (0, 1). Received: extra_fraction={extra_fraction}")
    return min(batch_size - 1, max(1, int(round(extra_fraction * batch_size))))


def batches_per_epoch(n, batch_size, extra_fraction=None):
    """Training batches in one epoch over ``n`` labelled examples: ceil(n / B), or with ``extra_fraction``
    (RST's mixed batches) the full batches of B − extras labelled examples each."""
    if extra_fraction is None:
        steps = math.ceil(n / batch_size)
    else:
        steps = n // (batch_size - extra_per_batch(batch_size, extra_fraction))
    if steps < 1:
        raise ConfigError(f"--batch-size {batch_size} leaves no full batch of the {n} labelled examples")
    return steps


def make_mixed_pipeline(x, y, x_extra, y_extra, batch_size, extra_fraction, seed=0, augment=None, epochs=(0, 1)):
    """Batches of (1 − f)·B labelled and f·B extra examples (RST) for epochs ``first … stop − 1``.

    One epoch is one pass over the labelled data (incomplete last batch dropped). Epoch e takes its labelled
    order and its extra examples (a stateless permutation of the pool, repeated when the pool is smaller than
    the epoch needs) from (seed, e), so a resumed run sees the batches of an uninterrupted one.
    """
    n_extra = extra_per_batch(batch_size, extra_fraction)
    n_labelled = batch_size - n_extra
    steps = batches_per_epoch(len(x), batch_size, extra_fraction)
    repeats = -(-steps * n_extra // len(x_extra))
    xs, ys, xe, ye = (tf.constant(a) for a in (x, y, x_extra, y_extra))
    shuffle, fold_in = tf.random.experimental.stateless_shuffle, tf.random.experimental.stateless_fold_in

    def one_epoch(e):
        key = fold_in(tf.constant([seed, 0], tf.int64), e)
        labelled = tf.reshape(shuffle(tf.range(len(x)), seed=fold_in(key, 0))[: steps * n_labelled], [steps, -1])
        extra = tf.concat([shuffle(tf.range(len(x_extra)), seed=fold_in(key, r + 1)) for r in range(repeats)], 0)
        extra = tf.reshape(extra[: steps * n_extra], [steps, n_extra])

        def batch(step, idx):
            images = tf.concat([tf.gather(xs, idx[0]), tf.gather(xe, idx[1])], 0)
            if augment is not None:
                images = augment(images, fold_in(key, -1 - step))
            return images, tf.concat([tf.gather(ys, idx[0]), tf.gather(ye, idx[1])], 0)

        return tf.data.Dataset.from_tensor_slices((labelled, extra)).enumerate().map(
            batch, num_parallel_calls=tf.data.AUTOTUNE)

    return tf.data.Dataset.range(*epochs).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def default_augment(name):
    """Whether ``name`` is trained with the authors' augmentation by default (the CIFAR-style sets)."""
    return name in TFDS_DATASETS


def augment_batch(images, key, flip=True, max_shift=0.1):
    """The authors' augmentation of a batch: random shifts up to ±``max_shift`` of the size (bilinear, nearest
    fill) and, with ``flip``, horizontal flips with probability ½.

    The draws are a stateless function of ``key`` (an int64 pair), so a resumed run can reproduce them; Keras'
    RandomTranslation/RandomFlip keep their RNG state inside the input pipeline, where no checkpoint reaches.
    The warp itself is ``keras.ops.image.affine_transform``, the op behind RandomTranslation.
    """
    import keras

    n = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    shift_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    shift = tf.random.stateless_uniform([n, 2], seed=shift_key, minval=-max_shift, maxval=max_shift)
    shift = shift * tf.constant([width, height], images.dtype)
    one, zero = tf.ones([n], images.dtype), tf.zeros([n], images.dtype)
    transform = tf.stack([one, zero, -shift[:, 0], zero, one, -shift[:, 1], zero, zero], axis=1)
    out = keras.ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="nearest")
    if flip:
        flipped = tf.random.stateless_uniform([n], seed=flip_key) < 0.5
        out = tf.where(flipped[:, None, None, None], tf.reverse(out, axis=[2]), out)
    return out


def make_pipeline(x, y, batch_size, shuffle=False, seed=0, drop_remainder=False, augment=None, epochs=None):
    """A ``tf.data`` pipeline over in-memory arrays (reshuffled each epoch when ``shuffle``).

    ``augment``: optional ``augment(images, key)`` applied per batch (see :func:`augment_batch`); its key comes
    from (seed, epoch, step), so it needs ``shuffle`` and ``epochs``.
    ``epochs=(first, stop)`` with ``shuffle``: one dataset holding epochs first … stop − 1, epoch e in an order
    (and with augmentation draws) that is a stateless function of (seed, e), so a run resumed at epoch e sees
    exactly the batches of an uninterrupted one (``fit`` then needs ``steps_per_epoch``).
    """
    if augment is not None and not (shuffle and epochs is not None):
        raise ConfigError("augment needs shuffle=True and epochs=(first, stop): its draws are keyed by epoch")
    if shuffle and epochs is not None:
        xs, ys, n = tf.constant(x), tf.constant(y), len(x)
        fold_in = tf.random.experimental.stateless_fold_in

        def one_epoch(e):
            epoch_key = fold_in(tf.constant([seed, 0], tf.int64), e)
            order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=epoch_key)
            batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=drop_remainder)
            if augment is None:
                return batches.map(lambda i: (tf.gather(xs, i), tf.gather(ys, i)))
            return batches.enumerate().map(
                lambda step, i: (augment(tf.gather(xs, i), fold_in(epoch_key, step)), tf.gather(ys, i)),
                num_parallel_calls=tf.data.AUTOTUNE)

        ds = tf.data.Dataset.range(*epochs).flat_map(one_epoch)
    else:
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if shuffle:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)
