"""Strip the BCS reparametrisation: a plain Keras model whose kernels hold the effective weights γ·max(0, θ).

The stripped model uses only standard Keras layers (Conv2D, Dense, BatchNormalization, …), so it loads with
``keras.models.load_model`` in a Python that never imported ``bcs_tf``, and every converter understands it.
BatchNorm is kept as a layer: LiteRT's converter and onnxruntime fold it into the preceding convolution
themselves, and keeping it makes the stripped model exactly equal to the trained one.
"""

from __future__ import annotations

import keras
import numpy as np

from bcs_tf.layers import SparseConv2D, SparseDense, SparseKernelMixin, sparse_layers
from bcs_tf.compact import compact_channels, has_channel_gates


def _plain_layer(layer):
    if isinstance(layer, SparseConv2D):
        return keras.layers.Conv2D(layer.filters, layer.kernel_size, strides=layer.strides, padding=layer.padding,
                                   use_bias=layer.use_bias, name=layer.name)
    if isinstance(layer, SparseDense):
        return keras.layers.Dense(layer.units, use_bias=layer.use_bias, name=layer.name)
    return layer.__class__.from_config(layer.get_config())


def strip_model(net):
    """Return a copy of ``net`` with every sparse layer replaced by its standard Keras counterpart (a
    channel-granular network: the narrower network it compacts into)."""
    if has_channel_gates(net):
        return compact_channels(net)
    plain = keras.models.clone_model(net, clone_function=_plain_layer)
    for src in net.layers:
        dst = plain.get_layer(src.name)
        if isinstance(src, SparseKernelMixin):
            weights = [np.asarray(src.kernel)] + ([np.asarray(src.bias)] if src.use_bias else [])
            dst.set_weights(weights)
        else:
            dst.set_weights(src.get_weights())
    return plain


WEIGHTED = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def kernel_nonzeros(model):
    """Nonzero count of every Conv2D / DepthwiseConv2D / Dense kernel of a (stripped) model, by layer name."""
    return {layer.name: int(np.count_nonzero(np.asarray(layer.kernel)))
            for layer in model.layers if isinstance(layer, WEIGHTED)}


def expected_nonzeros(net):
    """Nonzero kernel weights the stripped ``net`` must have: every active connection's weights (a block's
    all of them) and the kernels of its unpruned layers; None for a channel-granular network, whose compaction
    keeps only active channels."""
    if has_channel_gates(net):
        return None
    unpruned = sum(kernel_nonzeros(net).values())  # layers that are never sparse, e.g. depthwise kernels
    return unpruned + sum(layer.active_count() * layer.group_size for layer in sparse_layers(net))
