"""Channel compaction: a channel-granular network (:class:`~bcs_tf.layers.ChannelGate` after each normalised
layer) becomes a narrower plain Keras network with the same outputs.

A dormant gate (θ_c ≤ 0) makes channel c exactly zero after the following ReLU, so the producing layer's
output c, the normalisation's statistics of c and the next layer's input c (every spatial copy of it after a
Flatten) are cut out. An active gate's factor γ_c·max(0, θ_c) is folded into the BatchNormalization before it
(γ·BN(x) = BN with scale γ·g and offset γ·b), or into the producing kernel and bias when there is none; the
gate itself becomes an Identity, which the converters drop. Only chain networks (each layer feeding the next,
no residual additions) are compacted; the model zoo marks which ones are. The archive (bcs_tf.archive) uses the
same plan at full width: it stores the weights of dormant channels as zeros, which cost nothing compressed.
"""

from __future__ import annotations

import keras
import numpy as np

from bcs_tf.errors import ConfigError
from bcs_tf.layers import ChannelGate

PRODUCERS = (keras.layers.Conv2D, keras.layers.Dense)
CHANNELWISE = (keras.layers.BatchNormalization, keras.layers.DepthwiseConv2D)
PASS_THROUGH = (keras.layers.ReLU, keras.layers.Activation, keras.layers.MaxPooling2D,
                keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D, keras.layers.Dropout,
                keras.layers.Identity, keras.layers.ZeroPadding2D)


def has_channel_gates(net):
    """Whether ``net`` is channel-granular."""
    return any(isinstance(layer, ChannelGate) for layer in net.layers)


def _chain(net):
    layers = [layer for layer in net.layers if not isinstance(layer, keras.layers.InputLayer)]
    previous = net.inputs[0]
    for layer in layers:
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        if any(x is not previous for x in inputs):
            raise ConfigError(f"channel compaction needs a chain network; layer {layer.name!r} of {net.name} "
                              "does not take the previous layer's output alone")
        previous = layer.output
    return layers


def plan(net, keep_all=False):
    """``{layer name: (input channels kept, output channels kept, gate factors folded in)}`` (None = all).

    ``keep_all`` keeps dormant channels too (their gate factor 0 is folded in): the full-width twin."""
    entries, kept, producer, since = {}, None, None, []
    for layer in _chain(net):
        if isinstance(layer, PRODUCERS):
            entries[layer.name] = [kept, None, None]
            producer, since, kept = layer.name, [], None
        elif isinstance(layer, ChannelGate):
            if producer is None:
                raise ConfigError(f"gate {layer.name!r} has no layer before it whose channels it gates")
            factor = keras.ops.convert_to_numpy(layer.kernel).astype(np.float32)
            alive = np.arange(len(factor)) if keep_all else np.flatnonzero(factor != 0)
            if not len(alive):
                raise ConfigError(f"gate {layer.name!r} has no active channel: the network's output is constant")
            entries[producer][1] = alive
            bn = [name for name in since if isinstance(net.get_layer(name), keras.layers.BatchNormalization)]
            for name in since:  # the channel-wise layers between the producer and the gate
                entries[name][0] = alive
            target = bn[-1] if bn else producer
            entries[target][2] = factor[alive]
            kept, producer = alive, None
        elif isinstance(layer, CHANNELWISE):
            entries[layer.name] = [kept, kept, None]
            if producer is not None:
                since.append(layer.name)
        elif isinstance(layer, keras.layers.Concatenate) and kept is None:  # copies of one tensor (grey → RGB)
            pass
        elif isinstance(layer, keras.layers.Flatten):
            if kept is not None:
                channels = int(layer.input.shape[-1])
                positions = int(np.prod(layer.input.shape[1:-1]))
                kept = (np.arange(positions)[:, None] * channels + kept[None, :]).ravel()
            producer = None
        elif not isinstance(layer, PASS_THROUGH):
            raise ConfigError(f"channel compaction does not know layer {layer.name!r} ({type(layer).__name__})")
    return entries


def _narrow_layer(entries):
    def clone(layer):
        if isinstance(layer, ChannelGate):
            return keras.layers.Identity(name=layer.name)
        config = layer.get_config()
        out = entries.get(layer.name, (None, None, None))[1]
        if out is not None and isinstance(layer, keras.layers.Conv2D) and not isinstance(
                layer, keras.layers.DepthwiseConv2D):
            config["filters"] = len(out)
        elif out is not None and isinstance(layer, keras.layers.Dense):
            config["units"] = len(out)
        return layer.__class__.from_config(config)
    return clone


def _take(a, idx, axis):
    return a if idx is None else np.take(a, idx, axis=axis)


def _weights(layer, entry):
    src_in, out, factor = entry
    values = [np.asarray(w) for w in layer.get_weights()]
    if isinstance(layer, keras.layers.BatchNormalization):
        values = [_take(v, src_in, 0) for v in values]
        if factor is not None:  # [gamma, beta, moving mean, moving variance] (scale and center on)
            if not (layer.scale and layer.center):
                raise ConfigError(f"cannot fold a gate into {layer.name!r}: it has no scale or offset")
            values[0], values[1] = values[0] * factor, values[1] * factor
        return values
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [_take(values[0], src_in, 2)] + [_take(v, src_in, 0) for v in values[1:]]
    kernel = _take(_take(values[0], src_in, values[0].ndim - 2), out, values[0].ndim - 1)
    rest = [_take(v, out, 0) for v in values[1:]]
    if factor is not None:
        kernel, rest = kernel * factor, [v * factor for v in rest]
    return [kernel] + rest


def _blank(value, keep, axis, fill):
    if keep is None:
        return value
    dormant = np.setdiff1d(np.arange(value.shape[axis]), keep)
    index = [slice(None)] * value.ndim
    index[axis] = dormant
    value[tuple(index)] = fill
    return value


def dormant_channels_blanked(net):
    """``{id(variable): value}`` for the variables of channel-granular ``net`` that hold dormant channels, with
    those channels' entries blanked (0; 1 for a moving variance). A dormant gate multiplies its channel by 0 and
    the next layer then reads exact zeros, so the network with these values computes exactly what ``net`` does
    (same logits, bit for bit). ConfigError for a network that cannot be compacted (see :func:`plan`)."""
    blanked = {}
    for name, (src_in, out, _) in plan(net).items():
        layer = net.get_layer(name)
        for variable in layer.weights:
            value = np.array(keras.ops.convert_to_numpy(variable))
            if isinstance(layer, keras.layers.BatchNormalization):
                value = _blank(value, src_in, 0, 1.0 if "moving_variance" in variable.path else 0.0)
            elif isinstance(layer, keras.layers.DepthwiseConv2D):
                value = _blank(value, src_in, 2 if value.ndim == 4 else 0, 0.0)
            elif value.ndim > 1:  # a producer's kernel: [..., inputs, outputs]
                value = _blank(_blank(value, src_in, value.ndim - 2, 0.0), out, value.ndim - 1, 0.0)
            else:  # its bias
                value = _blank(value, out, 0, 0.0)
            blanked[id(variable)] = value
    return blanked


def compact_channels(net, keep_all=False):
    """The narrower plain Keras network equal to channel-granular ``net`` (see the module docstring); with
    ``keep_all``, the plain network of full width (dormant channels computed, then multiplied by 0)."""
    entries = plan(net, keep_all)
    plain = keras.models.clone_model(net, clone_function=_narrow_layer(entries))
    for src in net.layers:
        dst = plain.get_layer(src.name)
        if isinstance(src, ChannelGate) or not src.weights:
            continue
        dst.set_weights(_weights(src, entries[src.name]) if src.name in entries else src.get_weights())
    return plain
