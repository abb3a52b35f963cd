"""APGD (Croce & Hein, ICML 2020), L∞: in-graph, batched, with AutoAttack's targeted-DLR variant (APGD-T).

The algorithm of the authors' ``APGDAttack`` / ``APGDAttack_targeted``: a random start in the ε-ball, step size
η = 2ε, momentum 0.75 after the first step, and at the checkpoints p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (fractions of the iterations) the step is halved and the
iterate restarted from the best point, per example, when at most 75% of the steps since the last checkpoint
raised the loss (the authors' ``check_oscillation``: ``t <= k·ρ``), or when neither η nor the best loss changed
since then. As in their code, the first step of the first interval is compared with 0 (their ``loss_steps``
buffer starts as zeros), not with the loss at the random start. An example counts as broken as soon
as any iterate is misclassified.

The whole run is one ``tf.while_loop`` over iterations with per-example state (ART instead returns to Python
and NumPy at every step), and APGD-T's targets are a batch dimension: every surviving example is attacked
towards its 9 most likely wrong classes in one run rather than in 9 sequential ones.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def checkpoints(n_iter):
    """The iterations at which the step size may be halved: intervals of 22% of the iterations, each 3% shorter
    than the last down to 6%, in whole iterations as in the authors' code."""
    k, decrease, shortest = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    marks, at = [], k
    while at <= n_iter:
        marks.append(at)
        k = max(k - decrease, shortest)
        at += k
    return marks


def ce_loss(logits, y, target):
    """Untargeted cross-entropy (to be maximised); ``target`` is unused."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)


def targeted_dlr_loss(logits, y, target):
    """AutoAttack's targeted DLR: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2), to be maximised."""
    ranked = tf.sort(logits, axis=1, direction="DESCENDING")
    z_y = tf.gather(logits, y[:, None], batch_dims=1)[:, 0]
    z_t = tf.gather(logits, target[:, None], batch_dims=1)[:, 0]
    return -(z_y - z_t) / (ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + 1e-12)


def oscillating(increases, interval, rho):
    """The authors' step-halving test: at most ``rho`` of the ``interval`` steps since the last checkpoint raised
    the loss (``t <= k·k3`` in ``check_oscillation``; ``<`` would keep the step size on a tie)."""
    return increases <= rho * interval


class APGD:
    """``APGD(predict, eps, n_iter, loss)(x, y, target=None)`` → boolean array: still correctly classified after
    the attack (``loss`` is ``ce_loss`` or ``targeted_dlr_loss``). ``predict`` maps images in [0, 1] to logits."""

    def __init__(self, predict, eps, n_iter=100, loss=ce_loss, seed=0, rho=0.75, alpha=0.75):
        self.predict, self.eps, self.n_iter, self.loss = predict, float(eps), int(n_iter), loss
        self.seed, self.rho, self.alpha = int(seed), float(rho), float(alpha)
        marks = np.zeros(self.n_iter + 1, bool)
        marks[checkpoints(self.n_iter)] = True
        self._marks = tf.constant(marks)
        self._run = tf.function(self._attack, reduce_retracing=True)

    def _loss_and_grad(self, x, y, target):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = tf.cast(self.predict(x), tf.float32)
            loss = self.loss(logits, y, target)
        return loss, tape.gradient(loss, x), tf.argmax(logits, axis=1, output_type=tf.int32) != y

    def _attack(self, x, y, target):
        eps, n = self.eps, tf.shape(x)[0]
        shape = [-1] + [1] * (len(x.shape) - 1)  # a per-example value broadcast over the image
        project = lambda z: tf.clip_by_value(tf.clip_by_value(z, x - eps, x + eps), 0.0, 1.0)  # noqa: E731
        t = tf.random.stateless_uniform(tf.shape(x), [self.seed, 1], -1.0, 1.0)
        t_max = tf.reduce_max(tf.abs(tf.reshape(t, [n, -1])), axis=1)
        x_adv = project(x + eps * t / tf.reshape(t_max, shape))
        loss, grad, fooled = self._loss_and_grad(x_adv, y, target)
        step = tf.fill([n], 2.0 * eps)
        # ``loss`` is the previous step's loss, which the first step is compared with: 0, as in the authors' code
        state = dict(x_adv=x_adv, x_prev=x_adv, grad=grad, loss=tf.zeros_like(loss), fooled=fooled, best_loss=loss,
                     x_best=x_adv,
                     step=step, grad_best=grad, increases=tf.zeros([n]), last_best=loss,
                     step_reduced=tf.ones([n], tf.bool), since=tf.constant(0.0))

        def body(k, s):
            eta = tf.reshape(s["step"], shape)
            z = project(s["x_adv"] + eta * tf.sign(s["grad"]))
            x_new = tf.cond(k > 0, lambda: project(s["x_adv"] + self.alpha * (z - s["x_adv"])
                                                   + (1 - self.alpha) * (s["x_adv"] - s["x_prev"])), lambda: z)
            loss, grad, fooled = self._loss_and_grad(x_new, y, target)
            improved = loss > s["best_loss"]
            increases = s["increases"] + tf.cast(loss > s["loss"], tf.float32)
            best_loss = tf.where(improved, loss, s["best_loss"])
            x_best = tf.where(tf.reshape(improved, shape), x_new, s["x_best"])
            grad_best = tf.where(tf.reshape(improved, shape), grad, s["grad_best"])
            since = s["since"] + 1.0
            new = dict(x_adv=x_new, x_prev=s["x_adv"], grad=grad, loss=loss, fooled=s["fooled"] | fooled,
                       best_loss=best_loss, x_best=x_best, grad_best=grad_best, increases=increases,
                       last_best=s["last_best"], step=s["step"], step_reduced=s["step_reduced"], since=since)

            def at_checkpoint():
                too_few = oscillating(increases, since, self.rho)
                stalled = ~s["step_reduced"] & (s["last_best"] >= best_loss)
                halve = too_few | stalled
                restart = tf.reshape(halve, shape)
                return dict(new, step=tf.where(halve, s["step"] / 2.0, s["step"]), step_reduced=halve,
                            x_adv=tf.where(restart, x_best, x_new), grad=tf.where(restart, grad_best, grad),
                            increases=tf.zeros_like(increases), last_best=best_loss, since=tf.constant(0.0))

            return k + 1, tf.cond(self._marks[k + 1], at_checkpoint, lambda: new)

        _, final = tf.while_loop(lambda k, s: k < self.n_iter, body, (tf.constant(0), state))
        return ~final["fooled"], final["best_loss"], final["step"]

    def run(self, x, y, target=None):
        """``(still correct, best loss, final step size)`` per example."""
        y = tf.constant(np.asarray(y, np.int32))
        target = y if target is None else tf.constant(np.asarray(target, np.int32))
        return tuple(np.asarray(v) for v in self._run(tf.constant(x, tf.float32), y, target))

    def __call__(self, x, y, target=None):
        return self.run(x, y, target)[0]


def target_classes(logits, y, n_targets=9):
    """AutoAttack's APGD-T targets, ``(n, n_targets)``: per example the most likely classes other than ``y``, in
    order (the top class is skipped when it is ``y``)."""
    ranking = np.argsort(-np.asarray(logits), axis=1)
    return np.stack([np.where(ranking[:, 0] == y, ranking[:, r], ranking[:, r - 1])
                     for r in range(1, n_targets + 1)], axis=1)


def apgd_targeted(predict, x, y, eps, n_iter=100, n_targets=9, seed=0, batch_size=256, attack=None):
    """AutoAttack's APGD-T: targeted DLR against each of the ``n_targets`` most likely wrong classes, all targets
    of a chunk of examples in one batched run; returns the still-correct booleans. ``attack`` reuses an
    ``APGD(predict, eps, n_iter, targeted_dlr_loss, seed)`` (and its traced graph) across calls."""
    logits = np.concatenate([np.asarray(predict(tf.constant(x[i:i + batch_size])))
                             for i in range(0, len(x), batch_size)])
    robust = np.argmax(logits, 1) == y
    n_targets = min(n_targets, logits.shape[1] - 1)
    targets = target_classes(logits, y, n_targets)
    attack = attack or APGD(predict, eps, n_iter, targeted_dlr_loss, seed)
    idx = np.flatnonzero(robust)
    per_chunk = max(1, batch_size // n_targets)
    for i in range(0, len(idx), per_chunk):
        chunk = idx[i:i + per_chunk]
        xs = np.repeat(x[chunk], n_targets, axis=0)
        ys = np.repeat(y[chunk], n_targets)
        held = attack(xs, ys, targets[chunk].reshape(-1)).reshape(len(chunk), n_targets)
        robust[chunk] = held.all(axis=1)
    return robust
