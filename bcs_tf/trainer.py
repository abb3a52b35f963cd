"""``RobustTrainer``: a ``keras.Model`` whose compiled ``train_step`` is attack + robust loss + optimizer +
Langevin rewiring, so ``fit`` with standard Keras callbacks (progress bar, TensorBoard, checkpoints) works.

The trainer wraps the network (``trainer.net``); only the network is exported as ``model.keras``.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf
from keras import ops

from bcs_tf.attacks import AttackConfig, pgd
from bcs_tf.connectivity import ConnectivitySampler
from bcs_tf.errors import ConfigError
from bcs_tf.layers import frozen_kernels, sparse_layers


class RobustTrainer(keras.Model):
    """Robust (sparse) training of ``net``.

    Args:
        net: the network (sparse or dense layers) mapping images to logits.
        objective: an objective from :mod:`bcs_tf.objectives`.
        attack: :class:`AttackConfig` of the training attack.
        eval_attack: attack for validation (``test_step``); defaults to ``attack`` with a random start.
        allocation: budget groups from :func:`bcs_tf.models.build_model`; None for dense networks.
        rewire: True for BCS, False for the random-static baseline.
        temperature: Langevin temperature T (see :class:`ConnectivitySampler`).
        alpha: optional L1 prior strength on active θ (added to their gradient).
        seed: seed of the attack and sampler random streams (saved with the weights).
    """

    def __init__(self, net, objective, attack=None, eval_attack=None, allocation=None, rewire=True,
                 temperature=0.0, alpha=0.0, seed=0, **kwargs):
        super().__init__(**kwargs)
        if alpha < 0:
            raise ConfigError(f"alpha must be ≥ 0. Received: alpha={alpha}")
        self.net = net
        self.objective = objective
        self.attack = attack or AttackConfig()
        self.eval_attack = eval_attack or self.attack
        self.alpha = float(alpha)
        self.attack_seed = keras.random.SeedGenerator(seed)
        self.sampler_seed = keras.random.SeedGenerator(seed + 7919)
        self.sampler = None
        if allocation is not None:
            self.sampler = ConnectivitySampler(sparse_layers(net), allocation, temperature=temperature,
                                               rewire=rewire, seed_generator=self.sampler_seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.clean_acc = keras.metrics.SparseCategoricalAccuracy(name="clean_acc")
        self.robust_acc = keras.metrics.SparseCategoricalAccuracy(name="robust_acc")
        self.built = net.built  # the wrapper owns no weights of its own beyond the seed generators

    @property
    def metrics(self):
        return [self.loss_tracker, self.clean_acc, self.robust_acc]

    def call(self, inputs, training=False):
        return self.net(inputs, training=training)

    def prepare(self):
        """Build the optimizer and bind its slots to the sampler (call after ``compile``)."""
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        if self.sampler is not None:
            self.sampler.bind_optimizer(self.optimizer)
        self._theta_ids = {id(layer.theta) for layer in sparse_layers(self.net)}

    def inference_kernels(self):
        """Context in which attacks run: one precomputed kernel per sparse layer, no gradient w.r.t. θ."""
        return frozen_kernels(self.net)

    def training_kernels(self):
        """Context in which the loss runs (the layers' own kernels; subclasses may substitute others)."""
        return contextlib.nullcontext()

    # Logits in float32 whatever the compute dtype: losses and attack gradients need the precision.
    def _predict(self, x):
        return ops.cast(self.net(x, training=False), "float32")

    def _forward(self, x):
        return ops.cast(self.net(x, training=True), "float32")

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with self.inference_kernels():  # the attack needs no gradient w.r.t. θ
            x_adv = self.objective.adversarial(self._predict, x, y, self.attack, seed=self.attack_seed)
        variables = self.trainable_variables
        with tf.GradientTape() as tape, self.training_kernels():
            loss, logits_nat, logits_adv = self.objective.loss(self._forward, x, y, x_adv)
        grads = tape.gradient(loss, variables)
        if self.alpha > 0:
            # L1 prior α·Σ max(0, θ): its gradient is α on active entries, 0 on dormant ones.
            grads = [g + self.alpha * tf.cast(v > 0, g.dtype) if id(v) in self._theta_ids else g
                     for g, v in zip(grads, variables)]
        masks = self.sampler.active_masks() if self.sampler is not None else None
        learning_rate = self.optimizer.learning_rate
        self.optimizer.apply(grads, variables)
        if self.sampler is not None:
            self.sampler.after_update(masks, learning_rate)
        self.loss_tracker.update_state(loss)
        logs = {"loss": self.loss_tracker.result()}
        # Only the accuracies the objective computes are reported (decided at trace time).
        for metric, logits in ((self.clean_acc, logits_nat), (self.robust_acc, logits_adv)):
            if logits is not None:
                metric.update_state(y, logits)
                logs[metric.name] = metric.result()
        return logs

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with self.inference_kernels():
            return self._test_step(x, y)

    def _test_step(self, x, y):
        logits = self._predict(x)
        self.clean_acc.update_state(y, logits)
        a = self.eval_attack
        if a.steps > 0 and a.eps > 0:
            x_adv = pgd(self._predict, x, y, a.eps, a.step_size, a.steps, norm=a.norm, rand_init=True,
                        clip_min=a.clip_min, clip_max=a.clip_max, seed=self.attack_seed)
            self.robust_acc.update_state(y, self._predict(x_adv))
        return {m.name: m.result() for m in self.metrics[1:]}
