"""``python -m export.predict MODEL.tflite [--index N | --image FILE.npy|.png]``: classify one image with LiteRT.

The image must have the model's input size (read from the model); ``--index`` picks a Fashion-MNIST test image.

Only ``ai-edge-litert`` and numpy are needed at inference time; this is what runs on the device.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from bcs_run import cli

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def read_image(path, shape):
    """The image file ``path`` (.npy, or a picture Matplotlib reads such as .png) as a float (1, H, W, C) batch in
    [0, 1] for a model whose input is ``shape`` = (H, W, C); FlagError naming the file when it does not fit."""
    height, width, channels = shape
    picture = not path.endswith(".npy")
    try:
        if picture:
            import matplotlib.image

            image = matplotlib.image.imread(path).astype(np.float32)
        else:
            image = np.load(path).astype(np.float32)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL says SyntaxError for a file that is not a picture
        raise cli.FlagError(f"--image: cannot read {path}: {exc}") from None
    found = image.shape
    if picture and image.ndim == 3:  # drop alpha; grey from colour by the mean, colour from grey by repetition
        image = image[..., :3]
        image = image.mean(axis=-1, keepdims=True) if channels == 1 else image
    image = image[..., None] if image.ndim == 2 else image
    image = np.repeat(image, channels, axis=-1) if image.shape[-1] == 1 and channels > 1 else image
    if image.shape[-3:] != (height, width, channels) or image.size != height * width * channels:
        raise cli.FlagError(f"--image: {path} holds an image of shape {found}; the model takes "
                            f"{height}x{width}x{channels}")
    image = image / 255.0 if image.max() > 1.0 else image
    return image.reshape(1, height, width, channels)


def load_image(args, shape):
    """A (1, H, W, C) float image in [0, 1] for a model of input ``shape`` and its label (None when unknown)."""
    if args.image is not None:
        return read_image(args.image, shape), None
    if tuple(shape) != (28, 28, 1):
        raise cli.FlagError(f"--index picks a Fashion-MNIST test image (28x28x1), but the model takes "
                            f"{'x'.join(map(str, shape))} images: pass --image")
    from bcs_tf.data import load_fashion_mnist

    _, (x_test, y_test), _ = load_fashion_mnist(use_tfds=False)
    return x_test[args.index][None, ..., None].astype(np.float32) / 255.0, int(y_test[args.index])


def class_name(k, shape, num_classes):
    """Fashion-MNIST's name of class ``k`` for a Fashion-MNIST-shaped model, else ``class k``."""
    if tuple(shape) == (28, 28, 1) and num_classes == len(FASHION_MNIST_CLASSES):
        return FASHION_MNIST_CLASSES[k]
    return f"class {k}"


def build_parser():
    """The ``export.predict`` parser."""
    p = cli.parser("python -m export.predict", __doc__)
    p.add_argument("model", metavar="MODEL.tflite", help="a file written by `python -m export --format tflite`")
    p.add_argument("--index", type=int, default=0, help="Fashion-MNIST test image index, 0–9999")
    p.add_argument("--image", help="an .npy or .png image of the model's input size (28x28 grayscale for "
                   "Fashion-MNIST) instead of a test image")
    cli.add_verbose(p)
    return p


@cli.one_line_errors
def main(argv=None):
    """Print the predicted class and its probability."""
    args = build_parser().parse_args(argv)
    if not pathlib.Path(args.model).is_file():
        raise cli.FlagError(f"{args.model}: no such file")
    if args.image is None and not 0 <= args.index < 10000:
        raise cli.FlagError(f"--index must be in 0–9999. Received: {args.index}")
    cli.import_tensorflow(args.verbose)
    from export.tflite import interpreter, run

    try:
        with cli.native_output(args.verbose):  # LiteRT announces its delegate on stderr
            it = interpreter(pathlib.Path(args.model).read_bytes())
    except (ValueError, RuntimeError) as exc:  # LiteRT: "The model is not a valid Flatbuffer buffer", bad ops
        raise cli.FlagError(f"{args.model} is not a TFLite model LiteRT can run: {exc}") from None
    shape = tuple(int(d) for d in it.get_input_details()[0]["shape"][1:])
    x, label = load_image(args, shape)
    logits = run(it, x)[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = int(np.argmax(probs))
    truth = f" (true: {class_name(label, shape, len(probs))})" if label is not None else ""
    print(f"{class_name(top, shape, len(probs))}  p={probs[top]:.3f}{truth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
