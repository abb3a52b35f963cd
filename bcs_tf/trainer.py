"""``RobustTrainer``: a ``keras.Model`` whose compiled ``train_step`` is attack + robust loss + optimizer +
Langevin rewiring, so ``fit`` with standard Keras callbacks (progress bar, TensorBoard, checkpoints) works.

The trainer wraps the network (``trainer.net``); only the network is exported as ``model.keras``.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf
from keras import ops

from bcs_tf._keras_compat import distribute_strategy, symbolic_build
from bcs_tf.robustness.attacks import AttackConfig, pgd
from bcs_tf.connectivity import ConnectivitySampler
from bcs_tf.errors import ConfigError
from bcs_tf.layers import frozen_kernels, sparse_layers

# what StepHealth.code names, in the order the step checks them
NONFINITE = {1: "the loss", 2: "a gradient", 3: "a weight (θ) after the update"}


class StepHealth:
    """Set by the compiled step: 0 when its loss, gradients and updated weights are finite, else the first
    failing quantity's key in :data:`NONFINITE`. A plain object, so Keras does not save it with the weights
    (checkpoints keep their layout)."""

    def __init__(self):
        self.code = tf.Variable(0, trainable=False, dtype=tf.int32, name="step_health")

    def problem(self):
        """None while healthy, else the name of the quantity that became NaN or Inf."""
        return NONFINITE.get(int(self.code.numpy()))


def multi_worker(strategy):
    """Whether ``strategy`` spans several workers (``MultiWorkerMirroredStrategy`` with a cluster)."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def _per_worker_logs(logs):
    """Logs as shape-[1] tensors under several workers: Keras 3.15 reduces them across workers with
    ``axis=0``, which a scalar does not have; the reduction then gives back the scalar mean."""
    if not multi_worker(tf.distribute.get_strategy()):
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}


def _all_finite(tensors):
    return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t is not None]))


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
        jit: compile the attack, loss and gradients with XLA (the sampler stays outside: dynamic shapes).
    """

    def __init__(self, net, objective, attack=None, eval_attack=None, allocation=None, rewire=True,
                 temperature=0.0, alpha=0.0, seed=0, jit=False, **kwargs):
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
        self.health = StepHealth()
        self.jit = bool(jit)
        self._xla_core = tf.function(self._attack_and_gradients, jit_compile=True)
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

    def budget_problem(self):
        """None when every budget group holds exactly its budget of active connections, else what is wrong
        (checked before every save: a model must never be written with a connectivity other than its claim)."""
        if self.sampler is None:
            return None
        layers = self.sampler.layers
        return self.sampler.allocation.problem([layer.active_count() for layer in layers],
                                               [layer.name for layer in layers])

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

    def _attack_and_gradients(self, x, y):
        """The attack, the robust loss and its gradients: the dense, fixed-shape part of a step (XLA-able)."""
        with self.inference_kernels():  # the attack needs no gradient w.r.t. θ
            x_adv = self.objective.adversarial(self._predict, x, y, self.attack, seed=self.attack_seed)
        variables = self.trainable_variables
        with tf.GradientTape() as tape, self.training_kernels():
            loss, logits_nat, logits_adv = self.objective.loss(self._forward, x, y, x_adv)
            # the optimizer sums the replicas' gradients: each contributes its share of the global mean
            scaled = loss / tf.distribute.get_replica_context().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(scaled) if self._scaling else scaled
        return loss, logits_nat, logits_adv, tape.gradient(scaled, variables)

    @property
    def _scaling(self):
        return isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)  # mixed_float16

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        # With jit the attack and gradients run as one XLA cluster; the sampler's data-dependent shapes
        # (tf.where over the active entries) cannot, so it stays outside.
        core = self._xla_core if self.jit else self._attack_and_gradients
        loss, logits_nat, logits_adv, grads = core(x, y)
        variables = self.trainable_variables
        scaling = self._scaling
        if self.alpha > 0:
            # L1 prior α·Σ max(0, θ): its gradient is α on active entries, 0 on dormant ones (scaled like the
            # loss gradients when loss scaling is on).
            alpha = self.alpha / tf.distribute.get_replica_context().num_replicas_in_sync  # summed over replicas
            alpha = self.optimizer.scale_loss(alpha) if scaling else alpha
            grads = [g + alpha * tf.cast(v > 0, g.dtype) if id(v) in self._theta_ids else g
                     for g, v in zip(grads, variables)]
        masks = self.sampler.active_masks() if self.sampler is not None else None
        learning_rate = self.optimizer.learning_rate
        self.optimizer.apply(grads, variables)
        if self.sampler is not None:
            # once, in cross-replica context: every replica gets the same noise, deaths and re-activations
            tf.distribute.get_replica_context().merge_call(self._rewire, args=(masks, learning_rate))
        # checked every step (≈ one pass over the parameters) so a divergence stops training where it happens;
        # under loss scaling an overflowing gradient is normal (the optimizer skips that step and lowers the scale)
        grads_ok = tf.constant(True) if scaling else _all_finite(grads)
        self.health.code.assign(tf.where(~tf.reduce_all(tf.math.is_finite(loss)), 1,
                                         tf.where(~grads_ok, 2, tf.where(~_all_finite(variables), 3, 0))))
        self.loss_tracker.update_state(loss)
        logs = {"loss": self.loss_tracker.result()}
        # Only the accuracies the objective computes are reported (decided at trace time).
        for metric, logits in ((self.clean_acc, logits_nat), (self.robust_acc, logits_adv)):
            if logits is not None:
                metric.update_state(y, logits)
                logs[metric.name] = metric.result()
        return _per_worker_logs(logs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # A private Keras hook (bcs_tf._keras_compat.PRIVATE; its canary checks the signature). Keras 3.15 builds
        # from the first batch reduced across replicas; across workers that collective rejects the per-replica
        # batch. One replica's local batch has the shapes the build needs.
        strategy = distribute_strategy(self)
        if strategy is None or iterator is None or not multi_worker(strategy):
            return super()._maybe_symbolic_build(iterator, data_batch)
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, batch)
            break
        with strategy.scope():
            symbolic_build(self, data_batch)

    def _rewire(self, strategy, masks, learning_rate):
        first = strategy.experimental_local_results  # the replicas' masks are equal (mirrored θ)
        self.sampler.after_update([first(m)[0] for m in masks], first(learning_rate)[0])

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
        return _per_worker_logs({m.name: m.result() for m in self.metrics[1:]})
