"""Square attack (Andriushchenko et al., ECCV 2020), L∞, untargeted, score-based: in-graph and batched.

The same algorithm as the authors' ``square_attack_linf``: vertical-stripe initialisation; then, per query, a
random square window of side s (s² ≈ p·h·w, p following their schedule from ``p_init``) is set to x ± ε with a
random sign per channel, and the change is kept when it lowers the margin loss z_y − max_{j≠y} z_j; an example
stops once misclassified. Two differences in form, none in the search: each example draws its own window
position (the authors' code draws one position per batch, ART's one position and one sign for the whole batch),
and a window that would leave the image unchanged gets its signs flipped instead of being redrawn in a loop.

Queries run inside one ``tf.while_loop`` per chunk of ``chunk`` iterations; between chunks the examples that
are already fooled are dropped, so the cost falls as the attack succeeds (ART instead calls the model three
times per query from Python).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# the authors' schedule: p_init is halved at these fractions of the query budget
P_FRACTIONS = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)


def margin(logits, y):
    """z_y − max_{j≠y} z_j per example: negative once the example is misclassified."""
    y = tf.cast(y, tf.int32)
    z_y = tf.gather(logits, y[:, None], batch_dims=1)[:, 0]
    other = tf.where(tf.one_hot(y, tf.shape(logits)[1]) > 0, tf.cast(-np.inf, logits.dtype), logits)
    return z_y - tf.reduce_max(other, axis=1)


def p_schedule(i, n_queries, p_init):
    """Fraction of pixels in the window at query ``i`` of ``n_queries``."""
    k = tf.searchsorted(tf.constant(P_FRACTIONS, tf.float32),
                        tf.reshape(tf.cast(i, tf.float32) / float(n_queries), [1]), side="left")[0]
    return p_init * tf.pow(0.5, tf.cast(k, tf.float32))


def _signs(shape, seed):
    """±1 with equal probability."""
    return tf.where(tf.random.stateless_uniform(shape, seed) < 0.5, -1.0, 1.0)


class SquareAttack:
    """L∞ Square attack on a logits function ``predict`` (inputs in [0, 1], NHWC).

    ``SquareAttack(predict, eps, n_queries=5000)(x, y)`` returns the adversarial examples (numpy). ``seed``
    makes the draws reproducible.
    """

    def __init__(self, predict, eps, n_queries=5000, p_init=0.8, seed=0, chunk=250):
        self.predict, self.eps, self.n_queries = predict, float(eps), int(n_queries)
        self.p_init, self.seed, self.chunk = float(p_init), int(seed), int(chunk)
        self._run = tf.function(self._queries, reduce_retracing=True)

    def _loss(self, x, y):
        return margin(tf.cast(self.predict(x), tf.float32), y)

    def _queries(self, x, y, x_best, m_best, start, stop, key):
        """Queries ``start`` … ``stop``−1 on the batch; examples with margin ≤ 0 no longer change."""
        n = tf.shape(x)[0]
        h, w, c = x.shape[1:]  # static: the image shape does not change between chunks
        eps = self.eps
        rows = tf.range(h)[None, :, None, None]
        cols = tf.range(w)[None, None, :, None]

        def body(i, x_best, m_best):
            seed = tf.stack([key, i])
            p = p_schedule(i, self.n_queries, self.p_init)
            s = tf.cast(tf.round(tf.sqrt(p * float(h * w))), tf.int32)
            s = tf.clip_by_value(s, 1, min(h, w) - 1)
            top = tf.random.stateless_uniform([n], seed, 0, h - s, dtype=tf.int32)
            left = tf.random.stateless_uniform([n], seed + [0, 1 << 20], 0, w - s, dtype=tf.int32)
            sign = _signs([n, 1, 1, c], seed + [0, 2 << 20])
            window = ((rows >= top[:, None, None, None]) & (rows < (top + s)[:, None, None, None])
                      & (cols >= left[:, None, None, None]) & (cols < (left + s)[:, None, None, None]))

            def candidate(sign):
                return tf.where(window, tf.clip_by_value(x + sign * eps, 0.0, 1.0), x_best)

            x_new = candidate(sign)
            unchanged = tf.reduce_all(tf.abs(x_new - x_best) < 1e-7, axis=[1, 2, 3])
            x_new = tf.where(unchanged[:, None, None, None], candidate(-sign), x_new)
            m_new = self._loss(x_new, y)
            better = (m_new < m_best) & (m_best > 0)
            return (i + 1, tf.where(better[:, None, None, None], x_new, x_best), tf.where(better, m_new, m_best))

        def more(i, x_best, m_best):
            return (i < stop) & tf.reduce_any(m_best > 0)

        # The model's output may have an unknown batch size; broadcast against a batch of one, it would change the
        # loop variables' static shapes after one iteration, so they are declared batch-free.
        invariants = (start.shape, tf.TensorShape([None, h, w, c]), tf.TensorShape([None]))
        _, x_best, m_best = tf.while_loop(more, body, (start, x_best, m_best), shape_invariants=invariants)
        return x_best, m_best

    def __call__(self, x, y):
        x = tf.convert_to_tensor(np.asarray(x, np.float32))
        y = tf.convert_to_tensor(np.asarray(y, np.int32))
        n, _, w, c = x.shape
        stripes = _signs([n, 1, w, c], [self.seed, -1])
        x_best = tf.clip_by_value(x + self.eps * stripes, 0.0, 1.0)
        m_best = self._loss(x_best, y)
        out = x_best.numpy()
        active = np.flatnonzero(m_best.numpy() > 0)
        x_np, y_np, m_np = x.numpy(), y.numpy(), m_best.numpy()
        start = 1
        while start < self.n_queries and len(active):
            stop = min(start + self.chunk, self.n_queries)
            xb, mb = self._run(tf.constant(x_np[active]), tf.constant(y_np[active]), tf.constant(out[active]),
                               tf.constant(m_np[active]), tf.constant(start), tf.constant(stop),
                               tf.constant(self.seed))
            out[active], m_np[active] = xb.numpy(), mb.numpy()
            active = active[m_np[active] > 0]
            start = stop
        return out
