"""``python -m export.predict MODEL.tflite [--index N | --image FILE.npy|.png]``: classify one image with LiteRT.

Only ``ai-edge-litert`` and numpy are needed at inference time; this is what runs on the device.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bcs_tf.data import load_fashion_mnist
from export.tflite import interpreter, run

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def load_image(args):
    """A (1, 28, 28, 1) float image in [0, 1] and its label (None when unknown)."""
    if args.image is None:
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


def main(argv=None):
    """Print the predicted class and its probability."""
    p = argparse.ArgumentParser(prog="python -m export.predict", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--index", type=int, default=0, help="Fashion-MNIST test image index")
    p.add_argument("--image", help="a 28x28 grayscale .png or .npy instead")
    args = p.parse_args(argv)
    x, label = load_image(args)
    logits = run(interpreter(open(args.model, "rb").read()), x)[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = int(np.argmax(probs))
    truth = f" (true: {FASHION_MNIST_CLASSES[label]})" if label is not None else ""
    print(f"{FASHION_MNIST_CLASSES[top]}  p={probs[top]:.3f}{truth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
