"""Adapters to the adversarial-robustness-toolbox (ART): its APGD, Square and AutoAttack on a Keras network, and
its score-only Square on any runtime's predict function (an exported file's robustness, not a transfer).

Imported only when one of ART's attacks is asked for: importing ART runs ``logging.config.dictConfig``, which
closes every logging handler that exists at that moment (absl's closes its stream when that is not the current
``sys.stderr``), so an app that will use it imports this module once, up front.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, SquareAttack
from art.estimators.classification import BlackBoxClassifierNeuralNetwork, TensorFlowV2Classifier


class VectorisedDLRLoss:
    """ART's APGD "difference_logits_ratio" loss, −(z_y − z_i) / (z_π1 − z_π3), without ART's Python loop.

    z_i is the largest logit other than z_y. ART loops over the batch in Python to find i, which made its
    APGD-T 2.7× slower than APGD-CE here; this computes the same value batched (checked against ART's in
    tests). ``reduction`` is set by ART's estimator ("none", "sum", or else mean).
    """

    def __init__(self):
        self.reduction = "mean"

    def __call__(self, y_true, y_pred, *args, **kwargs):
        label = tf.argmax(tf.cast(y_true, tf.int32), axis=1, output_type=tf.int32)
        order = tf.argsort(y_pred, axis=1)
        ranked = tf.gather(y_pred, order, batch_dims=1)
        other = tf.where(order[:, -1] != label, order[:, -1], order[:, -2])
        z_y = tf.gather(y_pred, label[:, None], batch_dims=1)[:, 0]
        z_i = tf.gather(y_pred, other[:, None], batch_dims=1)[:, 0]
        dlr = -(z_y - z_i) / (ranked[:, -1] - ranked[:, -3])
        if self.reduction == "none":
            return dlr
        return tf.reduce_sum(dlr) if self.reduction == "sum" else tf.reduce_mean(dlr)


def classifier(model, num_classes, loss="cross_entropy"):
    """``model`` (inputs in [0, 1] → logits, with ``input_shape``) as ART's TensorFlowV2Classifier with ``loss``
    ("cross_entropy" or "dlr", the vectorised DLR)."""
    loss_object = (keras.losses.SparseCategoricalCrossentropy(from_logits=True) if loss == "cross_entropy"
                   else VectorisedDLRLoss())
    return TensorFlowV2Classifier(model=model, nb_classes=num_classes, input_shape=tuple(model.input_shape[1:]),
                                  loss_object=loss_object, clip_values=(0.0, 1.0))


def apgd(estimator, eps, targeted, restarts, batch_size, max_iter=100):
    """ART's L∞ APGD with the estimator's own loss (``loss_type=None``: the vectorised DLR for a "dlr" one)."""
    return AutoProjectedGradientDescent(estimator, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=max_iter,
                                        targeted=targeted, nb_random_init=restarts, batch_size=batch_size,
                                        loss_type=None, verbose=False)


def square(estimator, eps, queries, batch_size):
    """ART's L∞ Square attack with ``queries`` queries and one restart."""
    return SquareAttack(estimator, norm=np.inf, eps=eps, max_iter=queries, nb_restarts=1, batch_size=batch_size,
                        verbose=False)


def autoattack(estimator, attacks, eps, batch_size):
    """ART's AutoAttack class over ``attacks``, untargeted and then against every other class."""
    return AutoAttack(estimator, norm=np.inf, eps=eps, eps_step=2 * eps, attacks=attacks, batch_size=batch_size,
                      targeted=True)


def _batched(fn, x, batch_size=256):
    return np.concatenate([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def black_box_square(predict, x, y, eps, queries, seed=0):
    """Accuracy of ``predict`` (batch → logits, any runtime) under ART's L∞ Square attack, which sees only its
    scores (``BlackBoxClassifierNeuralNetwork``): robustness of the file itself, not transferred."""
    logits = _batched(predict, x[:2])
    estimator = BlackBoxClassifierNeuralNetwork(lambda b: _batched(predict, b.astype(np.float32)), x.shape[1:],
                                                logits.shape[1], channels_first=False, clip_values=(0.0, 1.0))
    np.random.seed(seed)  # ART draws its windows from NumPy's global generator
    attack = SquareAttack(estimator, norm=np.inf, eps=eps, max_iter=queries, nb_restarts=1, batch_size=len(x),
                          verbose=False)
    x_adv = attack.generate(x.astype(np.float32), y=np.eye(logits.shape[1], dtype=np.float32)[y])
    if np.max(np.abs(x_adv - x)) > eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError("Square left the ε-ball or [0, 1]")
    return float(np.mean(np.argmax(_batched(predict, x_adv), 1) == y))
