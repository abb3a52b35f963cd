"""Inverse weights inheritance (IWI; Wang et al., "Achieving adversarial robustness via sparsity").

A large network inherits the weights of a small sparse robust network of the same family (e.g. small_cnn →
small_cnn_x2, WRN-28-2 → WRN-28-4), then is adversarially trained. The variant built here:

- the small network's channels (units) are the *first* channels of each large layer: a small kernel of shape
  (…, c_in, c_out) lands at ``[..., :c_in, :c_out]`` of the large one; a dense layer after a Flatten maps
  position by position ((s, c) → (s, c) with the large channel count);
- inherited positions take the small network's *effective* weights, so its pruned entries start at exactly 0
  (the sparse weight distribution IWI imposes);
- the entries from new input channels into inherited output channels start at 0, so the large network
  computes exactly the small network's logits at the start (tested);
- entries of new output channels keep the large network's fresh He-normal initialisation, and new BatchNorm
  channels start at γ = 1, β = 0 (statistics 0 / 1), so the new units can learn (all-zero new units would
  be a saddle point that gradient descent never leaves);
- BatchNorm parameters and statistics and the dense biases of inherited channels are copied.
"""

from __future__ import annotations

import functools

import keras
import numpy as np

from bcs_tf._keras_compat import flatten_layers
from bcs_tf.errors import ConfigError
from bcs_tf.masks import PRUNABLE, kernels, prunable_layers


def _embed(small, large, new_inputs_zero=True):
    """``large`` with ``small`` in its leading corner; inputs beyond small's set to 0 for inherited outputs."""
    out = np.array(large, dtype=np.float32, copy=True)
    if small.ndim >= 2 and new_inputs_zero:
        out[..., :small.shape[-1]] = 0.0  # inherited outputs read nothing from new inputs
    out[tuple(slice(0, n) for n in small.shape)] = small
    return out


def _dense_after_flatten(small, large, c_small, c_large):
    """Embed a (S·c_small, out) kernel that reads a flattened (S, c) map into a (S·c_large, out') kernel."""
    spatial = small.shape[0] // c_small
    if spatial * c_small != small.shape[0] or spatial * c_large != large.shape[0]:
        raise ConfigError(f"cannot map a dense kernel of shape {small.shape} onto {large.shape}")
    s3 = small.reshape(spatial, c_small, small.shape[1])
    l3 = np.reshape(large, (spatial, c_large, large.shape[1]))
    return _embed(s3, l3).reshape(large.shape)


def _kernel_maps(small, large):
    """For each prunable layer of ``large``: ``(layer, small kernel, embed)``, embed(small, large) → large.

    A dense kernel whose input is wider than its predecessor's channels reads a flattened feature map and is
    mapped position by position; every other kernel goes into the leading corner.
    """
    small_layers = {layer.name: layer for layer in flatten_layers(small)}
    small_kernels = kernels(small)
    previous = None  # output channels (small, large) of the previous prunable layer
    for layer in prunable_layers(large):
        if not isinstance(small_layers.get(layer.name), PRUNABLE):
            raise ConfigError(f"the small network has no layer {layer.name!r}: not the same model family")
        s_kernel, l_shape = small_kernels[layer.name], tuple(layer.kernel.shape)
        if s_kernel.ndim != len(l_shape) or any(a > b for a, b in zip(s_kernel.shape, l_shape)):
            raise ConfigError(f"layer {layer.name!r}: small kernel {s_kernel.shape} does not fit into {l_shape}")
        if s_kernel.ndim == 2 and previous and s_kernel.shape[0] not in (l_shape[0], previous[0]):
            embed = functools.partial(_dense_after_flatten, c_small=previous[0], c_large=previous[1])
        else:
            embed = _embed
        yield layer, s_kernel, embed
        previous = (s_kernel.shape[-1], l_shape[-1])


def inherit_weights(small, large):
    """Initialise ``large`` from ``small`` as described in the module docstring (in place).

    Both networks must have the same layer names (models of one family); every large layer must be at least
    as wide as its small counterpart. Raises ConfigError otherwise.
    """
    small_layers = {layer.name: layer for layer in flatten_layers(small)}
    for layer, s_kernel, embed in _kernel_maps(small, large):
        layer.kernel.assign(embed(s_kernel, keras.ops.convert_to_numpy(layer.kernel)))
        src_bias = getattr(small_layers[layer.name], "bias", None)
        if getattr(layer, "bias", None) is not None and src_bias is not None:
            layer.bias.assign(_embed(keras.ops.convert_to_numpy(src_bias), keras.ops.convert_to_numpy(layer.bias)))
    for layer in flatten_layers(large):
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.name not in small_layers:
                raise ConfigError(f"the small network has no layer {layer.name!r}: not the same model family")
            for var, value in zip(layer.weights, small_layers[layer.name].get_weights()):
                var.assign(_embed(value, keras.ops.convert_to_numpy(var)))


def inherited_positions(small, large):
    """``{layer name: bool mask}`` of the large kernel entries that inherit a small-network weight."""
    return {layer.name: embed(np.ones(s_kernel.shape, np.float32), np.zeros(tuple(layer.kernel.shape))) > 0
            for layer, s_kernel, embed in _kernel_maps(small, large)}
