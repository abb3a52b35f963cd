"""``python -m export.predict MODEL.tflite [--index N | --image FILE.npy|.png]``: classify one image with LiteRT.

Only ``ai-edge-litert`` and numpy are needed at inference time; this is what runs on the device.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from bcs_run import cli

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def load_image(args):
    """A (1, 28, 28, 1) float image in [0, 1] and its label (None when unknown)."""
    if args.image is None:
        from bcs_tf.data import load_fashion_mnist

        _, (x_test, y_test), _ = load_fashion_mnist(use_tfds=False)
        return x_test[args.index][None, ..., None].astype(np.float32) / 255.0, int(y_test[args.index])
    if args.image.endswith(".npy"):
        image = np.load(args.image).astype(np.float32)
    else:
        import matplotlib.image

        image = matplotlib.image.imread(args.image).astype(np.float32)
        image = image.mean(axis=-1) if image.ndim == 3 else image
    image = image / 255.0 if image.max() > 1.0 else image
    return image.reshape(1, 28, 28, 1), None


def build_parser():
    """The ``export.predict`` parser."""
    p = cli.parser("python -m export.predict", __doc__)
    p.add_argument("model", metavar="MODEL.tflite", help="a file written by `python -m export --format tflite`")
    p.add_argument("--index", type=int, default=0, help="Fashion-MNIST test image index, 0–9999")
    p.add_argument("--image", help="a 28x28 grayscale .png or .npy instead of a test image")
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

    x, label = load_image(args)
    with cli.native_output(args.verbose):  # LiteRT announces its delegate on stderr
        it = interpreter(pathlib.Path(args.model).read_bytes())
    logits = run(it, x)[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = int(np.argmax(probs))
    truth = f" (true: {FASHION_MNIST_CLASSES[label]})" if label is not None else ""
    print(f"{FASHION_MNIST_CLASSES[top]}  p={probs[top]:.3f}{truth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
