"""HYDRA's pruning phase (Sehwag et al., NeurIPS 2020): learn importance scores with the robust loss.

Every kernel entry of a pre-trained network gets a score s. The forward pass uses the subnetwork
``w ⊙ m`` with m the top-k of |s| (k = the budget), and the gradient reaches the scores straight through the
top-k (``m + |s| − stop_gradient(|s|)``), as in the authors' ``GetSubnet``. Weights and the dense layers'
biases stay frozen; BatchNorm keeps training (their default ``freeze_bn=False``). Scores start at HYDRA's
"scaled score init" ``sqrt(6 / fan_in) · w / max|w|`` per layer.

The top-k follows the budget groups of the allocation: per layer, HYDRA's own rule (k = round(c·n) in every
layer; ``training.run``'s default for ``--method hydra``), or, as a named variant (``--budget global``, labelled
"HYDRA (global k)" wherever it appears), one top-k over all layers.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import tensorflow as tf
from keras import ops

from bcs_tf.layers import sparse_layers
from bcs_tf.masks import top_k_masks
from bcs_tf.trainer import RobustTrainer


def scaled_score_init(layer):
    """HYDRA's scaled score initialisation of one sparse layer: sqrt(6 / fan_in) · w / max|w|."""
    w = ops.convert_to_numpy(layer.kernel).astype(np.float32)
    peak = float(np.max(np.abs(w))) or 1.0
    return (math.sqrt(6.0 / layer.fan_in) * w / peak).astype(np.float32)


class HydraScoreTrainer(RobustTrainer):
    """Robust training of HYDRA importance scores on a frozen pre-trained network.

    Args:
        net: a sparse network whose entries are all active and carry the pre-trained weights.
        objective, attack: as for :class:`RobustTrainer`.
        allocation: the budget groups of the target connectivity (k of each top-k).
        seed: seed of the attack random stream.
    """

    def __init__(self, net, objective, attack, allocation, seed=0, **kwargs):
        super().__init__(net, objective, attack, allocation=None, seed=seed, **kwargs)
        self.allocation = allocation
        self._step_keep = None
        self.prunable = sparse_layers(net)
        for layer in self.prunable:  # weights and (non-BatchNorm) biases frozen, as HYDRA's prune mode
            layer.theta.trainable = False
            if layer.bias is not None:
                layer.bias.trainable = False
        self.scores = [
            self.add_weight(name=f"{layer.name}_score", shape=tuple(layer.theta.shape), trainable=True,
                            initializer=_constant(scaled_score_init(layer)))
            for layer in self.prunable
        ]

    def _keep(self):
        """0/1 top-k masks of |scores| per budget group (in-graph)."""
        keep = [None] * len(self.scores)
        for group, budget in zip(self.allocation.groups, self.allocation.budgets):
            flat = tf.concat([tf.reshape(tf.abs(self.scores[i]), [-1]) for i in group], axis=0)
            idx = tf.math.top_k(flat, k=budget, sorted=False).indices
            chosen = tf.scatter_nd(idx[:, None], tf.ones([budget]), tf.shape(flat))
            offset = 0
            for i in group:
                n = int(np.prod(self.scores[i].shape))
                keep[i] = tf.reshape(chosen[offset:offset + n], self.scores[i].shape)
                offset += n
        return keep

    def _attack_and_gradients(self, x, y):
        # the scores change only in the update after it: one top-k serves the step's attack and its loss
        self._step_keep = tuple(self._keep())
        try:
            return super()._attack_and_gradients(x, y)
        finally:
            self._step_keep = None

    @contextlib.contextmanager
    def _subnetwork(self, straight_through):
        keep_masks = self._step_keep if self._step_keep is not None else self._keep()
        for layer, score, keep in zip(self.prunable, self.scores, keep_masks):
            w = tf.stop_gradient(layer.effective_kernel())
            if straight_through:  # value: the 0/1 mask; gradient: d|s|/ds
                keep = keep + tf.abs(score) - tf.stop_gradient(tf.abs(score))
            layer._kernel_override = w * keep
        try:
            yield
        finally:
            for layer in self.prunable:
                layer._kernel_override = None

    def inference_kernels(self):
        """Attacks and validation see the current subnetwork, without gradients to the scores."""
        return self._subnetwork(straight_through=False)

    def training_kernels(self):
        """The loss sees the subnetwork with the straight-through gradient to the scores."""
        return self._subnetwork(straight_through=True)

    def masks(self):
        """The final masks: exact top-k of |scores| per budget group, as numpy booleans (layer order)."""
        return top_k_masks([np.abs(ops.convert_to_numpy(s)) for s in self.scores], self.allocation)


def _constant(value):
    return lambda shape, dtype=None: value
