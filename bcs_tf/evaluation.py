"""Clean and PGD accuracy of a trained network on a test set (compiled, batched, with a progress bar)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from bcs_tf.attacks import default_step_size, pgd_restarts


def robust_accuracy(net, x, y, eps, steps, step_size=None, restarts=1, norm="linf", batch_size=256, seed=0,
                    verbose=1):
    """Return ``(clean_acc, pgd_acc)`` of ``net`` on ``(x, y)``.

    PGD uses ``steps`` steps of ``step_size`` (default 2.5·ε/steps) from a random start, ``restarts`` times,
    keeping the worst case per example. ``net`` runs in inference mode.
    """
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    generator = keras.random.SeedGenerator(seed)

    def predict(z):
        return net(z, training=False)

    @tf.function(reduce_retracing=True)
    def batch_counts(xb, yb):
        clean = tf.equal(tf.argmax(predict(xb), axis=1, output_type=tf.int32), yb)
        if steps > 0 and eps > 0:
            x_adv = pgd_restarts(predict, xb, yb, eps, step_size, steps, restarts=restarts, norm=norm,
                                 seed=generator)
            robust = tf.equal(tf.argmax(predict(x_adv), axis=1, output_type=tf.int32), yb)
        else:
            robust = clean
        return tf.reduce_sum(tf.cast(clean, tf.int32)), tf.reduce_sum(tf.cast(robust, tf.int32))

    n = len(x)
    bar = keras.utils.Progbar(n, verbose=verbose, stateful_metrics=["clean_acc", "pgd_acc"])
    n_clean = n_robust = 0
    for start in range(0, n, batch_size):
        xb = tf.constant(x[start:start + batch_size], tf.float32)
        yb = tf.constant(np.asarray(y[start:start + batch_size], np.int32))
        c, r = batch_counts(xb, yb)
        n_clean, n_robust = n_clean + int(c), n_robust + int(r)
        done = min(start + batch_size, n)
        bar.update(done, [("clean_acc", n_clean / done), ("pgd_acc", n_robust / done)])
    return n_clean / n, n_robust / n
