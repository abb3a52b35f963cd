"""Robustness: the in-graph attacks (FGSM, PGD, APGD, Square), the one :class:`Evaluator` that runs named attacks
on a network, and ART's attacks behind adapters imported only when asked for (:mod:`bcs_tf.robustness.art`)."""

from bcs_tf.robustness.attacks import AttackConfig, default_step_size, fgsm, pgd, pgd_restarts
from bcs_tf.robustness.evaluator import Evaluator, robust_accuracy

__all__ = ["AttackConfig", "Evaluator", "default_step_size", "fgsm", "pgd", "pgd_restarts", "robust_accuracy"]
