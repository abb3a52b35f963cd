"""Layer factories: one model definition serves the sparse (BCS) and the dense variant.

A :class:`LayerFactory` hands out either the sparse θ/γ layers or standard Keras layers, and remembers the
*profile tag* of every prunable layer (e.g. ``"first"``, ``"stage1"``, ``"output"``), from which
:func:`bcs_tf.models.build_model` derives the authors' initial per-layer connectivity.
"""

from __future__ import annotations

import dataclasses
import itertools

import keras
import tensorflow as tf

from bcs_tf.layers import SparseConv2D, SparseDense


@dataclasses.dataclass
class LayerFactory:
    """Creates the prunable layers of a model: sparse (θ, γ) layers or their dense Keras counterparts."""

    sparse: bool
    connectivity: float = 1.0
    seed: int = 0
    tags: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._counter = itertools.count()

    def _seed(self):
        return self.seed * 1000 + next(self._counter)

    def conv(self, filters, kernel_size=3, strides=1, name=None, tag="middle", padding="same"):
        """A bias-free convolution (BatchNorm follows or precedes it in every model)."""
        self.tags[name] = tag
        if self.sparse:
            return SparseConv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                                connectivity=self.connectivity, seed=self._seed(), name=name)
        return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                                   kernel_initializer=keras.initializers.HeNormal(self._seed()), name=name)

    def dense(self, units, name=None, tag="middle"):
        """A fully connected layer with a dense bias; the output layer computes in float32 under mixed precision."""
        self.tags[name] = tag
        dtype = "float32" if tag == "output" else None
        if self.sparse:
            return SparseDense(units, connectivity=self.connectivity, seed=self._seed(), name=name, dtype=dtype)
        return keras.layers.Dense(units, kernel_initializer=keras.initializers.HeNormal(self._seed()), name=name,
                                  dtype=dtype)


def batch_norm(name):
    """BatchNorm; synchronized across replicas under a multi-replica ``tf.distribute`` strategy, so its
    statistics are those of the global batch (training then matches one device's)."""
    return keras.layers.BatchNormalization(name=name,
                                           synchronized=tf.distribute.get_strategy().num_replicas_in_sync > 1)


def bn_relu(x, name):
    """BatchNorm followed by ReLU."""
    x = batch_norm(f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def conv_bn_relu(f, x, filters, strides, name, tag="middle"):
    """3×3 convolution, BatchNorm, ReLU."""
    return bn_relu(f.conv(filters, 3, strides=strides, name=f"{name}_conv", tag=tag)(x), name)
