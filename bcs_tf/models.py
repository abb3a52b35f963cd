"""Model definitions written once against a layer factory, so dense and sparse variants share them.

A :class:`LayerFactory` hands out either the sparse BCS layers or the standard Keras layers; every model
also declares its initial per-layer connectivity profile (denser first and output layers, as the authors
do), which :func:`bcs_tf.connectivity.allocate_budget` scales to the exact global budget.
"""

from __future__ import annotations

import dataclasses
import itertools

import keras

from bcs_tf.connectivity import configure_connectivity
from bcs_tf.errors import ConfigError
from bcs_tf.layers import SparseConv2D, SparseDense

METHODS = ("bcs", "random", "dense")


@dataclasses.dataclass
class LayerFactory:
    """Creates the prunable layers of a model: sparse (θ, γ) layers or their dense Keras counterparts."""

    sparse: bool
    connectivity: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self._counter = itertools.count()

    def _seed(self):
        return self.seed * 1000 + next(self._counter)

    def conv(self, filters, kernel_size=3, strides=1, name=None):
        """A bias-free 3×3-style convolution (BatchNorm follows it in every model)."""
        if self.sparse:
            return SparseConv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                                connectivity=self.connectivity, seed=self._seed(), name=name)
        return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                                   kernel_initializer=keras.initializers.HeNormal(self._seed()), name=name)

    def dense(self, units, name=None):
        """A fully connected layer with a dense bias."""
        if self.sparse:
            return SparseDense(units, connectivity=self.connectivity, seed=self._seed(), name=name)
        return keras.layers.Dense(units, kernel_initializer=keras.initializers.HeNormal(self._seed()), name=name)


def _conv_bn_relu(f, x, filters, strides, name):
    x = f.conv(filters, 3, strides=strides, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def small_cnn(f, input_shape=(28, 28, 1), num_classes=10):
    """Three conv-BN-ReLU blocks (16, 32/2, 64/2 channels) and a 128-unit dense head (≈426k kernel entries).

    Sized for CPU adversarial training: a PGD-10 TRADES step at batch 128 takes ≈0.2 s here (bench/).
    """
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(f, inputs, 16, 1, "block1")
    x = _conv_bn_relu(f, x, 32, 2, "block2")
    x = _conv_bn_relu(f, x, 64, 2, "block3")
    x = keras.layers.Flatten(name="flatten")(x)
    x = f.dense(128, name="fc1")(x)
    x = keras.layers.BatchNormalization(name="fc1_bn")(x)
    x = keras.layers.ReLU(name="fc1_relu")(x)
    outputs = f.dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def small_cnn_profile(c):
    """Initial per-layer connectivities (authors' pattern: dense-ish first/output layers, 0.5c in the middle)."""
    return [0.6, 0.2, 0.5 * c, 0.5 * c, 0.6]


MODELS = {"small_cnn": (small_cnn, small_cnn_profile)}


def build_model(name="small_cnn", method="bcs", connectivity=0.01, budget="global", seed=0,
                input_shape=(28, 28, 1), num_classes=10):
    """Build model ``name`` for ``method``; returns ``(model, allocation)`` (allocation is None when dense).

    ``method="dense"`` or ``connectivity=1`` gives standard Keras layers; otherwise every conv and dense
    kernel is a sparse layer and the exact budget is set (see :func:`bcs_tf.connectivity.allocate_budget`).
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model; choose one of {sorted(MODELS)}. Received: model={name!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown method; choose one of {METHODS}. Received: method={method!r}")
    if not (0.0 < connectivity <= 1.0):
        raise ConfigError(f"connectivity must be in (0, 1]. Received: connectivity={connectivity}")
    builder, profile = MODELS[name]
    sparse = method != "dense" and connectivity < 1.0
    keras.utils.set_random_seed(seed)
    model = builder(LayerFactory(sparse, connectivity, seed), input_shape=tuple(input_shape), num_classes=num_classes)
    if not sparse:
        return model, None
    allocation = configure_connectivity(model, connectivity, budget, profile(connectivity), seed=seed)
    return model, allocation
