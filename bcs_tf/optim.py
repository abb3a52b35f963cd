"""Optimizers and learning-rate schedules by name: the one place ``training.run``, its HYDRA and lottery phases
and ``bench.step_time`` get them from, so a benchmark times the optimizer users train with."""

from __future__ import annotations

import keras


def _piecewise(total_steps, lr):
    """The authors' schedule: ×0.1 at 50% and again at 75% of training."""
    boundaries = [max(1, int(0.5 * total_steps)), max(2, int(0.75 * total_steps))]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [lr, lr * 0.1, lr * 0.01])


SCHEDULES = {
    "piecewise": _piecewise,
    "cosine": lambda total_steps, lr: keras.optimizers.schedules.CosineDecay(lr, max(1, total_steps)),
    "constant": lambda total_steps, lr: lr,
}
OPTIMIZERS = {
    "sgd": lambda lr, momentum, wd: keras.optimizers.SGD(lr, momentum=momentum, weight_decay=wd),
    "adam": lambda lr, momentum, wd: keras.optimizers.Adam(lr, weight_decay=wd),
    "adamw": lambda lr, momentum, wd: keras.optimizers.AdamW(lr, weight_decay=wd),
    "rmsprop": lambda lr, momentum, wd: keras.optimizers.RMSprop(lr, momentum=momentum, weight_decay=wd),
}


def make_optimizer(name, schedule, lr, total_steps, momentum=0.9, weight_decay=0.0, scale=1.0):
    """Optimizer ``name`` on ``schedule`` from ``lr`` × ``scale`` over ``total_steps``.

    Keras applies θ ← θ − lr_t·wd·θ, so passing ``weight_decay / lr`` makes the decay follow the learning-rate
    schedule exactly as the authors' wd_t does (checked bit-exact for SGD); ``scale`` (the halvings of
    ``--on-nan restore``) scales the decay with the rate.
    """
    return OPTIMIZERS[name](SCHEDULES[schedule](total_steps, lr * scale), momentum,
                            weight_decay / lr if lr > 0 else 0.0)
