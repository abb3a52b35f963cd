"""Static masks from weights: magnitude pruning under exact budgets, and moving weights onto a masked network.

The baselines that start from a pre-trained network (Fixed, HYDRA's fine-tuning, lottery tickets) all end in
the same place: a sparse network of the same architecture whose mask never changes (the random-static
sampler mode, ``rewire=False``) and whose surviving entries start from given weights. Layers are matched by
name, which :class:`~bcs_tf.factory.LayerFactory` keeps identical between the dense and sparse variant.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from bcs_tf._keras_compat import flatten_layers
from bcs_tf.connectivity import REGROW_VALUE
from bcs_tf.errors import ConfigError
from bcs_tf.layers import SparseKernelMixin, sparse_layers

PRUNABLE = (SparseKernelMixin, keras.layers.Conv2D, keras.layers.Dense)


def prunable_layers(model):
    """The conv and dense layers of ``model`` (sparse or standard), in a stable order."""
    return [layer for layer in flatten_layers(model) if isinstance(layer, PRUNABLE)]


def kernels(model):
    """``{layer name: effective kernel as numpy}`` of every prunable layer (γ·max(0, θ) for sparse layers)."""
    return {layer.name: keras.ops.convert_to_numpy(layer.kernel).astype(np.float32)
            for layer in prunable_layers(model)}


def top_k_masks(scores, allocation):
    """Boolean masks keeping, in each budget group of ``allocation``, the ``budget`` entries of largest score.

    ``scores`` is a list of arrays in the order of the allocation's layers. Ties are broken by position
    (stable sort), so the count is exact whatever the values.
    """
    masks = [np.zeros(s.shape, bool) for s in scores]
    for group, budget in zip(allocation.groups, allocation.budgets):
        flat = np.concatenate([np.asarray(scores[i], np.float64).ravel() for i in group])
        if budget > flat.size:
            raise ConfigError(f"budget {budget} exceeds the {flat.size} entries of its group")
        keep = np.zeros(flat.size, bool)
        keep[np.argsort(-flat, kind="stable")[:budget]] = True
        offset = 0
        for i in group:
            n = masks[i].size
            masks[i] = keep[offset:offset + n].reshape(masks[i].shape)
            offset += n
    return masks


def magnitude_masks(weights, allocation):
    """Global (or per-layer, following the allocation's groups) magnitude pruning: the largest |w| survive."""
    return top_k_masks([np.abs(w) for w in weights], allocation)


def masked_allocation(allocation, masks):
    """The allocation of a static network carrying ``masks`` (same groups and budgets, counts as masked)."""
    counts = tuple(int(m.sum()) for m in masks)
    problem = allocation.problem(counts)
    if problem:
        raise ConfigError(f"the masks keep {problem}")
    return dataclasses.replace(allocation, counts=counts)


def set_masked_kernel(layer, kernel, mask):
    """θ = max(|w|, 1e-12) where ``mask`` holds and 0 elsewhere; γ = sign(w) (+1 for w = 0) on the mask."""
    kernel = np.asarray(kernel, np.float32)
    mask = np.asarray(mask, bool)
    if kernel.shape != tuple(layer.theta.shape) or mask.shape != kernel.shape:
        raise ConfigError(f"layer {layer.name}: kernel {kernel.shape} / mask {mask.shape} do not fit θ "
                          f"{tuple(layer.theta.shape)}")
    sign = np.where(mask, np.where(kernel < 0, -1.0, 1.0), keras.ops.convert_to_numpy(layer.sign))
    layer.theta.assign(np.where(mask, np.maximum(np.abs(kernel), REGROW_VALUE), 0.0).astype(np.float32))
    layer.sign.assign(sign.astype(np.float32))


def transfer(source, target, masks=None, kernel_source=None):
    """Copy ``source``'s weights into ``target`` layer by layer (matched by name).

    Sparse layers of ``target`` take their kernel from ``kernel_source`` (default ``source``) restricted to
    ``masks`` (``{layer name: bool array}``); every other weight (BatchNorm, biases, dense kernels) is copied
    as is. Raises ConfigError when the two networks do not have the same layers and shapes.
    """
    src_kernels = kernels(kernel_source if kernel_source is not None else source)
    by_name = {layer.name: layer for layer in flatten_layers(source)}
    for layer in flatten_layers(target):
        if not layer.weights or isinstance(layer, keras.Model):
            continue
        src = by_name.get(layer.name)
        if src is None:
            raise ConfigError(f"the source network has no layer {layer.name!r}")
        if isinstance(layer, SparseKernelMixin):
            set_masked_kernel(layer, src_kernels[layer.name], masks[layer.name])
            if layer.bias is not None:
                layer.bias.assign(keras.ops.convert_to_numpy(src.bias))
            continue
        values = src.get_weights()
        if [v.shape for v in values] != [tuple(w.shape) for w in layer.weights]:
            raise ConfigError(f"layer {layer.name!r} has other shapes in the source network")
        layer.set_weights(values)


def static_masked_network(net, allocation, masks, source, kernel_source=None):
    """Give the fresh sparse ``net`` the ``masks`` (layer order) and ``source``'s weights; returns (net, alloc).

    ``allocation`` is ``net``'s own (from ``build_model``); the returned one counts the masked entries.
    """
    named = dict(zip([layer.name for layer in sparse_layers(net)], masks))
    transfer(source, net, named, kernel_source)
    return net, masked_allocation(allocation, masks)


def imp_connectivities(connectivity, rounds):
    """Connectivity after each round of iterative magnitude pruning that keeps the same fraction every round."""
    if rounds < 1:
        raise ConfigError(f"pruning rounds must be ≥ 1. Received: rounds={rounds}")
    return [connectivity ** (r / rounds) for r in range(1, rounds + 1)]
