"""In-graph adversarial attacks: FGSM and PGD (L∞ / L2, random start, restarts).

Attacks are pure functions ``(model_fn, x, y, ...) -> x_adv`` of TensorFlow ops, so they run eagerly or
inside ``tf.function`` (the training step) alike. ``model_fn`` maps inputs to logits; callers decide the
model mode (training uses inference-mode BatchNorm for the attack). Inputs live in ``[clip_min, clip_max]``.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from bcs_tf.errors import ConfigError

NORMS = ("linf", "l2")


def default_step_size(eps, steps):
    """PGD's step when none is given: 2.5·ε/steps (Madry et al.), so the iterate can cross the ε-ball."""
    return 2.5 * eps / max(steps, 1)


def cross_entropy(logits, y):
    """Per-example sparse softmax cross-entropy."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=logits)


def _batch_norm(v, keepdims=True):
    flat = tf.reshape(v, [tf.shape(v)[0], -1])
    n = tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1) + 1e-12)
    return tf.reshape(n, [-1] + [1] * (len(v.shape) - 1)) if keepdims else n


def project(x_adv, x, eps, norm="linf", clip_min=0.0, clip_max=1.0):
    """Project ``x_adv`` onto the ``norm``-ball of radius ``eps`` around ``x`` and into the pixel range."""
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        delta = delta * tf.minimum(1.0, eps / _batch_norm(delta))
    return tf.clip_by_value(x + delta, clip_min, clip_max)


def _step_direction(grad, norm):
    return tf.sign(grad) if norm == "linf" else grad / _batch_norm(grad)


def _random_start(x, eps, norm, seed):
    if norm == "linf":
        return keras.random.uniform(tf.shape(x), -eps, eps, seed=seed)
    direction = keras.random.normal(tf.shape(x), seed=seed)
    dims = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), tf.float32)
    radius = eps * keras.random.uniform([tf.shape(x)[0]], seed=seed) ** (1.0 / dims)  # uniform in the L2 ball
    return direction / _batch_norm(direction) * tf.reshape(radius, [-1] + [1] * (len(x.shape) - 1))


def _loss_grad(loss_fn, x_adv):
    with tf.GradientTape() as tape:
        tape.watch(x_adv)
        loss = tf.reduce_sum(loss_fn(x_adv))
    return tape.gradient(loss, x_adv)


def fgsm(model_fn, x, y, eps, norm="linf", clip_min=0.0, clip_max=1.0, loss_fn=None):
    """Fast gradient (sign) method: one step of size ε from x."""
    return pgd(model_fn, x, y, eps, step_size=eps, steps=1, norm=norm, rand_init=False,
               clip_min=clip_min, clip_max=clip_max, loss_fn=loss_fn)


def pgd(model_fn, x, y, eps, step_size, steps, norm="linf", rand_init=True, clip_min=0.0, clip_max=1.0,
        loss_fn=None, init=None, seed=None):
    """Projected gradient ascent on ``loss_fn`` (default: cross-entropy on ``y``).

    Args:
        model_fn: callable inputs -> logits.
        eps, step_size, steps: radius, step length, number of steps (``steps`` may be a tensor).
        norm: ``"linf"`` (sign steps) or ``"l2"`` (normalised-gradient steps).
        rand_init: start from a uniform random point of the ball (Madry et al.).
        loss_fn: optional per-example loss of the adversarial input, ``x_adv -> [batch]``.
        init: optional explicit starting point (e.g. TRADES' x + 0.001·N(0, 1)); overrides ``rand_init``.
        seed: ``keras.random.SeedGenerator`` or int for the random start.
    """
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {NORMS}. Received: norm={norm!r}")
    x = tf.convert_to_tensor(x, tf.float32)
    if loss_fn is None:
        loss_fn = lambda xa: cross_entropy(model_fn(xa), y)  # noqa: E731
    if init is not None:
        x_adv = project(init, x, eps, norm, clip_min, clip_max)
    elif rand_init:
        x_adv = project(x + _random_start(x, eps, norm, seed), x, eps, norm, clip_min, clip_max)
    else:
        x_adv = x

    def step(i, x_adv):
        grad = _loss_grad(loss_fn, x_adv)
        return i + 1, tf.stop_gradient(
            project(x_adv + step_size * _step_direction(grad, norm), x, eps, norm, clip_min, clip_max))

    # An explicit while_loop: Keras compiles train_step without AutoGraph, and the loop must not unroll.
    _, x_adv = tf.while_loop(lambda i, _: i < steps, step, (tf.constant(0), x_adv))
    return x_adv


def pgd_restarts(model_fn, x, y, eps, step_size, steps, restarts=1, norm="linf", clip_min=0.0, clip_max=1.0,
                 seed=None):
    """PGD with ``restarts`` random starts, keeping per example the worst case found.

    Worst = misclassified if any restart misclassifies, otherwise the highest cross-entropy.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    best = x
    best_score = tf.fill([tf.shape(x)[0]], -float("inf"))
    for _ in range(int(restarts)):
        cand = pgd(model_fn, x, y, eps, step_size, steps, norm=norm, rand_init=True, clip_min=clip_min,
                   clip_max=clip_max, seed=seed)
        logits = model_fn(cand)
        wrong = tf.not_equal(tf.argmax(logits, axis=1, output_type=tf.int32), tf.cast(y, tf.int32))
        # Misclassification dominates any loss value.
        score = cross_entropy(logits, y) + tf.where(wrong, 1e6, 0.0)
        better = score > best_score
        best = tf.where(tf.reshape(better, [-1] + [1] * (len(x.shape) - 1)), cand, best)
        best_score = tf.maximum(score, best_score)
    return best


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Settings of the attack used in training (and, by default, for validation)."""

    eps: float = 0.1
    step_size: float = 0.025
    steps: int = 10
    norm: str = "linf"
    clip_min: float = 0.0
    clip_max: float = 1.0

    def __post_init__(self):
        if self.eps < 0:
            raise ConfigError(f"eps must be ≥ 0. Received: eps={self.eps}")
        if self.step_size < 0:
            raise ConfigError(f"attack step size must be ≥ 0. Received: attack_step_size={self.step_size}")
        if self.steps < 0:
            raise ConfigError(f"attack steps must be ≥ 0. Received: attack_steps={self.steps}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}. Received: norm={self.norm!r}")
