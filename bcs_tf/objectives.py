"""Robust training objectives as pure functions of a model function and a batch.

Each objective has two parts:

- ``adversarial(predict, x, y, attack, seed)``: the inputs it trains on, crafted with ``predict`` (the model in
  inference mode, BatchNorm statistics frozen, as the authors do);
- ``loss(forward, x, y, x_adv)``: the scalar loss with ``forward`` (the model in training mode), plus the
  clean and adversarial logits when computed (for metrics).
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from bcs_tf.robustness.attacks import cross_entropy, pgd
from bcs_tf.errors import ConfigError


def kl_divergence(logits_p, logits_q):
    """Per-example KL(softmax(p) ‖ softmax(q)), summed over classes."""
    log_p = tf.nn.log_softmax(logits_p)
    log_q = tf.nn.log_softmax(logits_q)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=1)


class Objective:
    """The interface of a training objective (see the module docstring); ``name`` is its ``--objective``."""

    name = ""

    def adversarial(self, predict, x, y, attack, seed=None):
        """The batch it trains on, crafted with ``predict`` (inference mode) under ``attack``; None: clean only."""
        raise NotImplementedError

    def loss(self, forward, x, y, x_adv):
        """``(scalar loss, clean logits or None, adversarial logits or None)`` with ``forward`` (training mode)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Natural(Objective):
    """Standard (non-robust) training on clean inputs."""

    name = "natural"

    def adversarial(self, predict, x, y, attack, seed=None):
        return None

    def loss(self, forward, x, y, x_adv):
        logits = forward(x)
        return tf.reduce_mean(cross_entropy(logits, y)), logits, None


@dataclasses.dataclass(frozen=True)
class MadryAT(Objective):
    """PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples with random start."""

    name = "at"

    def adversarial(self, predict, x, y, attack, seed=None):
        return pgd(predict, x, y, attack.eps, attack.step_size, attack.steps, norm=attack.norm, rand_init=True,
                   clip_min=attack.clip_min, clip_max=attack.clip_max, seed=seed)

    def loss(self, forward, x, y, x_adv):
        logits_adv = forward(x_adv)
        return tf.reduce_mean(cross_entropy(logits_adv, y)), None, logits_adv


@dataclasses.dataclass(frozen=True)
class _RobustnessWeighted(Objective):
    """Objectives with a weight β on their robustness (KL) term."""

    beta: float = 6.0

    def __post_init__(self):
        if self.beta < 0:
            raise ConfigError(f"beta must be ≥ 0. Received: beta={self.beta}")


@dataclasses.dataclass(frozen=True)
class Trades(_RobustnessWeighted):
    """TRADES (Zhang et al. 2019): CE(x) + β·KL(p(x) ‖ p(x_adv)), x_adv maximising the KL term."""

    name = "trades"

    def adversarial(self, predict, x, y, attack, seed=None):
        logits_nat = tf.stop_gradient(predict(x))
        start = x + 0.001 * keras.random.normal(tf.shape(x), seed=seed)
        return pgd(predict, x, y, attack.eps, attack.step_size, attack.steps, norm=attack.norm, init=start,
                   clip_min=attack.clip_min, clip_max=attack.clip_max,
                   loss_fn=lambda xa: kl_divergence(logits_nat, predict(xa)))

    def loss(self, forward, x, y, x_adv):
        logits_nat = forward(x)
        logits_adv = forward(x_adv)
        natural = tf.reduce_mean(cross_entropy(logits_nat, y))
        robust = tf.reduce_mean(kl_divergence(logits_nat, logits_adv))
        return natural + self.beta * robust, logits_nat, logits_adv


@dataclasses.dataclass(frozen=True)
class MixedBatchAT(Objective):
    """Mixed-batch AT (Kurakin et al. 2017): PGD examples for the first half of the batch, clean rest."""

    name = "mat"

    def adversarial(self, predict, x, y, attack, seed=None):
        half = tf.shape(x)[0] // 2
        x_adv = MadryAT().adversarial(predict, x[:half], y[:half], attack, seed)
        return tf.concat([x_adv, x[half:]], axis=0)

    def loss(self, forward, x, y, x_adv):
        logits = forward(x_adv)
        return tf.reduce_mean(cross_entropy(logits, y)), None, logits


@dataclasses.dataclass(frozen=True)
class Mart(_RobustnessWeighted):
    """MART (Wang et al. 2020): boosted CE on x_adv + β·KL(p(x) ‖ p(x_adv))·(1 − p_y(x))."""

    name = "mart"

    def adversarial(self, predict, x, y, attack, seed=None):
        start = x + 0.001 * keras.random.normal(tf.shape(x), seed=seed)
        return pgd(predict, x, y, attack.eps, attack.step_size, attack.steps, norm=attack.norm, init=start,
                   clip_min=attack.clip_min, clip_max=attack.clip_max)

    def loss(self, forward, x, y, x_adv):
        logits_nat, logits_adv = forward(x), forward(x_adv)
        y = tf.cast(y, tf.int32)
        adv_probs = tf.nn.softmax(logits_adv)
        # The most likely wrong class under attack (MART's "new_y").
        top2 = tf.math.top_k(adv_probs, k=2).indices
        wrong = tf.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
        boost = -tf.math.log(1.0001 - tf.gather(adv_probs, wrong, batch_dims=1) + 1e-12)
        loss_adv = tf.reduce_mean(cross_entropy(logits_adv, y)) + tf.reduce_mean(boost)
        nat_probs = tf.nn.softmax(logits_nat)
        true_probs = tf.gather(nat_probs, y, batch_dims=1)
        kl = tf.reduce_sum(nat_probs * (tf.math.log(nat_probs + 1e-30) - tf.math.log(adv_probs + 1e-12)), axis=1)
        robust = tf.reduce_mean(kl * (1.0000001 - true_probs))
        return loss_adv + self.beta * robust, logits_nat, logits_adv


@dataclasses.dataclass(frozen=True)
class Rst(Trades):
    """RST (Carmon et al. 2019): the TRADES loss on batches mixing labelled and pseudo-labelled data."""

    name = "rst"


OBJECTIVES = {"natural": Natural, "at": MadryAT, "mat": MixedBatchAT, "trades": Trades, "mart": Mart,
              "rst": Rst}


def make_objective(name, beta=6.0):
    """Objective instance by name (``natural``, ``at``, ``mat``, ``trades``, ``mart``, ``rst``)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective; choose one of {sorted(OBJECTIVES)}. Received: objective={name!r}")
    cls = OBJECTIVES[name]
    return cls(beta=beta) if "beta" in {f.name for f in dataclasses.fields(cls)} else cls()
