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

from bcs_tf.errors import ConfigError
from bcs_tf.layers import ChannelGate, SparseConv2D, SparseDense

GRANULARITIES = ("weight", "block", "channel")


@dataclasses.dataclass
class LayerFactory:
    """Creates the prunable layers of a model: sparse (θ, γ) layers or their dense Keras counterparts.

    ``granularity`` is what one connection is: a weight; a block of ``block_size`` consecutive inputs of a
    dense layer's output (convolutions keep weights: no LiteRT kernel runs block-sparse convolutions); or a
    channel (plain layers, each normalised output gated by a :class:`~bcs_tf.layers.ChannelGate`).
    """

    sparse: bool
    connectivity: float = 1.0
    seed: int = 0
    tags: dict = dataclasses.field(default_factory=dict)
    granularity: str = "weight"
    block_size: int = 4

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}. Received: {self.granularity!r}")
        self._counter = itertools.count()
        self._weights = self.sparse and self.granularity != "channel"  # kernels carry θ themselves

    def _seed(self):
        return self.seed * 1000 + next(self._counter)

    def conv(self, filters, kernel_size=3, strides=1, name=None, tag="middle", padding="same"):
        """A bias-free convolution (BatchNorm follows or precedes it in every model)."""
        self.tags[name] = tag
        if self._weights:
            return SparseConv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                                connectivity=self.connectivity, seed=self._seed(), name=name)
        return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                                   kernel_initializer=keras.initializers.HeNormal(self._seed()), name=name)

    def dense(self, units, name=None, tag="middle"):
        """A fully connected layer with a dense bias; the output layer computes in float32 under mixed precision."""
        self.tags[name] = tag
        dtype = "float32" if tag == "output" else None
        if self._weights:
            block = self.block_size if self.granularity == "block" else 1
            return SparseDense(units, connectivity=self.connectivity, seed=self._seed(), name=name, dtype=dtype,
                               block_size=block)
        return keras.layers.Dense(units, kernel_initializer=keras.initializers.HeNormal(self._seed()), name=name,
                                  dtype=dtype)

    def gate(self, x, name, tag="middle"):
        """``x`` through a channel gate at channel granularity (before the nonlinearity), else ``x`` itself."""
        if not (self.sparse and self.granularity == "channel"):
            return x
        name = f"{name}_gate"
        self.tags[name] = tag
        return ChannelGate(connectivity=self.connectivity, seed=self._seed(), name=name)(x)


def batch_norm(name):
    """BatchNorm; synchronized across replicas under a multi-replica ``tf.distribute`` strategy, so its
    statistics are those of the global batch (training then matches one device's)."""
    return keras.layers.BatchNormalization(name=name,
                                           synchronized=tf.distribute.get_strategy().num_replicas_in_sync > 1)


def bn_relu(x, name):
    """BatchNorm followed by ReLU."""
    x = batch_norm(f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def gated_bn_relu(f, x, name, tag="middle"):
    """BatchNorm, the channel gate (at channel granularity), ReLU."""
    x = f.gate(batch_norm(f"{name}_bn")(x), name, tag)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def conv_bn_relu(f, x, filters, strides, name, tag="middle", kernel_size=3):
    """Convolution (3×3 by default), BatchNorm, channel gate, ReLU."""
    return gated_bn_relu(f, f.conv(filters, kernel_size, strides=strides, name=f"{name}_conv", tag=tag)(x), name,
                         tag)
