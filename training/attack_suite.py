"""The attacks of ``training.evaluate`` on a Keras network: bcs_tf's in-graph FGSM/PGD, APGD-CE, APGD-T and
Square (ART's behind ``apgd="art"`` / ``square="art"``), ART's AutoAttack class, foolbox's Brendel & Bethge;
AutoAttack's standard sequence on the survivors."""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

# ART's import runs logging.config.dictConfig, which closes every logging handler that exists at that moment
# (absl's closes its stream when that is not the current sys.stderr): import it here, once, up front.
from art.estimators.classification import TensorFlowV2Classifier

from bcs_tf.apgd import APGD, apgd_targeted, ce_loss, targeted_dlr_loss
from bcs_tf.attacks import default_step_size, fgsm, pgd_restarts
from bcs_tf.errors import ConfigError
from bcs_tf.square import SquareAttack
from training.evaluate import AA_STANDARD, pgd_steps

class InferenceFunction:
    """``net`` in inference mode as one compiled function.

    ART and foolbox call the model eagerly at every attack step; a traced call removes Keras' per-call Python
    overhead (ART's APGD-CE runs 1.6× faster on the Fashion-MNIST CNN). Gradients flow through it as usual.
    """

    def __init__(self, net):
        self.net = net
        self.input_shape = net.input_shape
        self._fn = tf.function(lambda z: net(z, training=False), reduce_retracing=True)

    def __call__(self, x, training=False):
        return self._fn(tf.cast(x, tf.float32))


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


class Evaluator:
    """Runs named attacks on ``net`` (logits model, inputs in [0, 1]) in batches with progress bars.

    Each attack's per-example outcome on the current test arrays is kept, so AutoAttack reuses APGD-CE and
    APGD-T when they ran before it, exactly as its standard version runs each attack only on the survivors.
    """

    def __init__(self, net, eps, num_classes, batch_size=256, restarts=1, seed=0, square_queries=5000,
                 verbose=1, bb_steps=1000, autoattack="standard", square="tf", apgd="tf"):
        if autoattack not in ("standard", "art"):
            raise ConfigError(f"--autoattack must be 'standard' or 'art'. Received: {autoattack!r}")
        if square not in ("tf", "art"):
            raise ConfigError(f"--square must be 'tf' or 'art'. Received: {square!r}")
        if apgd not in ("tf", "art"):
            raise ConfigError(f"--apgd must be 'tf' or 'art'. Received: {apgd!r}")
        self.square_version, self.apgd_version = square, apgd
        self.net, self.eps, self.num_classes = InferenceFunction(net), float(eps), num_classes
        self.batch_size, self.restarts, self.seed = batch_size, restarts, seed
        self.square_queries, self.verbose, self.bb_steps = square_queries, verbose, bb_steps
        self.autoattack_version = autoattack
        self._classifiers, self._apgd_tf = {}, {}
        self._outcomes, self._outcomes_for = {}, None

    def predict(self, x):
        """Logits in inference mode."""
        return self.net(x)

    def art_classifier(self, loss="cross_entropy"):
        """The network wrapped for ART with ``loss`` ("cross_entropy" or "dlr"), built once each."""
        if loss not in self._classifiers:
            loss_object = (keras.losses.SparseCategoricalCrossentropy(from_logits=True) if loss == "cross_entropy"
                           else VectorisedDLRLoss())
            self._classifiers[loss] = TensorFlowV2Classifier(
                model=self.net, nb_classes=self.num_classes, input_shape=tuple(self.net.input_shape[1:]),
                loss_object=loss_object, clip_values=(0.0, 1.0))
        return self._classifiers[loss]

    def _apgd_in_graph(self, loss, restart):
        """bcs_tf's APGD with ``loss`` for random start ``restart``, built (and traced) once."""
        key = (loss, restart)
        if key not in self._apgd_tf:
            self._apgd_tf[key] = APGD(self.predict, self.eps, loss=loss, seed=self.seed + restart)
        return self._apgd_tf[key]

    def _on_survivors(self, attack, x, y):
        """Still-correct booleans after ``attack(x, y, restart)`` ran once per random restart, each time on the
        examples no earlier restart broke."""
        robust = self.clean(x, y)
        for restart in range(self.restarts):
            idx = np.flatnonzero(robust)
            if len(idx):
                robust[idx] = attack(x[idx], y[idx], restart)
        return robust

    def _apgd(self, loss, targeted, max_iter=100):
        from art.attacks.evasion import AutoProjectedGradientDescent

        # loss_type=None: APGD uses the classifier's own loss (ART's DLR loss, vectorised, for "dlr").
        return AutoProjectedGradientDescent(
            self.art_classifier(loss), norm=np.inf, eps=self.eps, eps_step=2 * self.eps, max_iter=max_iter,
            targeted=targeted, nb_random_init=self.restarts, batch_size=self.batch_size, loss_type=None,
            verbose=False)

    def _square(self):
        from art.attacks.evasion import SquareAttack as ArtSquare

        return ArtSquare(self.art_classifier(), norm=np.inf, eps=self.eps, max_iter=self.square_queries,
                            nb_restarts=1, batch_size=self.batch_size, verbose=False)

    # Each attack maps a batch (x, y) to a boolean array: still correctly classified.
    def clean(self, x, y):
        return np.argmax(self.predict(x), 1) == y

    def fgsm(self, x, y):
        return np.argmax(self.predict(fgsm(self.predict, x, y, self.eps)), 1) == y

    def pgd(self, steps):
        gen = keras.random.SeedGenerator(self.seed)

        @tf.function(reduce_retracing=True)
        def attack(xb, yb):
            return pgd_restarts(self.predict, xb, yb, self.eps, default_step_size(self.eps, steps), steps,
                                restarts=self.restarts, seed=gen)

        return lambda x, y: np.argmax(self.predict(attack(tf.constant(x), tf.constant(y))), 1) == y

    def apgd_ce(self, x, y):
        """APGD with cross-entropy, 100 iterations, ``restarts`` random starts."""
        if self.apgd_version == "tf":
            return self._on_survivors(lambda xs, ys, restart: self._apgd_in_graph(ce_loss, restart)(xs, ys), x, y)
        x_adv = self._apgd("cross_entropy", False).generate(x, y=y)
        return np.argmax(self.predict(x_adv), 1) == y

    def apgd_t(self, x, y):
        """Targeted APGD-DLR against each of the top-9 wrong classes (as AutoAttack's APGD-T)."""
        if self.apgd_version == "tf":
            return self._on_survivors(
                lambda xs, ys, restart: apgd_targeted(self.predict, xs, ys, self.eps, batch_size=self.batch_size,
                                                      attack=self._apgd_in_graph(targeted_dlr_loss, restart)), x, y)
        attack = self._apgd("dlr", True)
        ranking = np.argsort(-np.asarray(self.predict(x)), axis=1)
        robust = self.clean(x, y)
        for rank in range(1, min(10, self.num_classes)):
            target = np.where(ranking[:, 0] == y, ranking[:, rank], ranking[:, rank - 1])
            idx = np.flatnonzero(robust)
            if not len(idx):
                break
            x_adv = attack.generate(x[idx], y=target[idx])
            robust[idx] &= np.argmax(self.predict(x_adv), 1) == y[idx]
        return robust

    def square(self, x, y):
        """Square attack (score-based, no gradients) with ``square_queries`` queries: bcs_tf's in-graph one, or
        ART's with ``square="art"``."""
        robust = self.clean(x, y)
        idx = np.flatnonzero(robust)
        if len(idx):
            if self.square_version == "tf":
                x_adv = SquareAttack(self.predict, self.eps, self.square_queries, seed=self.seed)(x[idx], y[idx])
            else:
                x_adv = self._square().generate(x[idx], y=y[idx])
            robust[idx] = np.argmax(self.predict(x_adv), 1) == y[idx]
        return robust

    def autoattack_art(self, x, y):
        """ART's AutoAttack class: APGD-CE, APGD-DLR and Square untargeted, then APGD-CE and APGD-DLR against
        every other class (a superset of the standard set, and slower)."""
        from art.attacks.evasion import AutoAttack

        attacks = [self._apgd("cross_entropy", False), self._apgd("dlr", True), self._square()]
        aa = AutoAttack(self.art_classifier(), norm=np.inf, eps=self.eps, eps_step=2 * self.eps, attacks=attacks,
                        batch_size=self.batch_size, targeted=True)
        return np.argmax(self.predict(aa.generate(x, y=y)), 1) == y

    def bb(self, x, y):
        """foolbox 3 Brendel & Bethge L∞ (a minimum-norm attack), counted robust when its ‖δ‖∞ > ε.

        B&B needs an adversarial starting point for every example (foolbox asserts it); we give each the
        nearest-in-batch image the model assigns another class, which always exists once the batch holds two
        predicted classes (else the example counts as robust to B&B).
        """
        import foolbox

        pred = np.argmax(self.predict(x), 1)
        starts, has_start = x.copy(), pred != y
        for i in np.flatnonzero(~has_start):
            other = np.flatnonzero(pred != y[i])
            if len(other):
                j = other[np.argmin(np.abs(x[other] - x[i]).reshape(len(other), -1).max(axis=1))]
                starts[i], has_start[i] = x[j], True
        robust = self.clean(x, y)
        idx = np.flatnonzero(robust & has_start)
        if len(idx):
            fmodel = foolbox.TensorFlowModel(self.net, bounds=(0.0, 1.0))
            attack = foolbox.attacks.LinfinityBrendelBethgeAttack(steps=self.bb_steps)
            # int64 labels: eagerpy's dtype promotion uses an API numpy 2 removed.
            _, _, success = attack(fmodel, tf.constant(x[idx]), tf.constant(y[idx].astype(np.int64)),
                                   epsilons=self.eps, starting_points=tf.constant(starts[idx]))
            robust[idx] = ~np.asarray(success)
        return robust

    def run(self, name, x, y):
        """Accuracy under attack ``name`` on ``(x, y)`` and the seconds it took (after the standard AutoAttack,
        ``stages`` holds the accuracy left after each of its parts)."""
        if self._outcomes_for is not x:
            self._outcomes, self._outcomes_for = {}, x
        if name == "autoattack" and self.autoattack_version == "standard":
            robust, seconds = self._standard_autoattack(x, y)
        else:
            if self.verbose:
                print(f"{name}:")
            robust, seconds = self.run_batches(self.resolve(name), x, y)
        self._outcomes[name] = robust, seconds
        return float(np.mean(robust)), seconds

    def run_batches(self, fn, x, y):
        """``fn`` (batch → still-correct booleans) over ``(x, y)`` in batches with a progress bar; returns the
        booleans and the seconds taken."""
        bar = keras.utils.Progbar(len(x), verbose=self.verbose, stateful_metrics=["acc"])
        robust, start = np.zeros(len(x), bool), time.time()
        for i in range(0, len(x), self.batch_size):
            robust[i:i + self.batch_size] = fn(x[i:i + self.batch_size], y[i:i + self.batch_size])
            done = min(i + self.batch_size, len(x))
            bar.update(done, [("acc", robust[:done].mean())])
        return robust, time.time() - start

    def _standard_autoattack(self, x, y):
        """APGD-CE → APGD-T → Square, each on the survivors; a component already run on ``x`` is reused.

        The seconds are the sum of the components' measured times (for a reused one, its whole run).
        """
        robust, seconds = self._outcomes.get("clean") or self.run_batches(self.clean, x, y)
        robust = robust.copy()
        self.stages = {"clean": float(np.mean(robust))}
        for name in AA_STANDARD:
            if name in self._outcomes:
                outcome, took = self._outcomes[name]
                robust &= outcome
            else:
                idx = np.flatnonzero(robust)
                if self.verbose:
                    print(f"autoattack/{name} on {len(idx)} surviving examples:")
                outcome, took = self.run_batches(self.resolve(name), x[idx], y[idx])
                robust[idx] = outcome
            seconds += took
            self.stages[name] = float(np.mean(robust))
        return robust, seconds

    def resolve(self, name):
        """The batch function of attack ``name`` (``pgdK`` for any K)."""
        steps = pgd_steps(name)
        if steps:
            return self.pgd(steps)
        table = {"clean": self.clean, "fgsm": self.fgsm, "apgd-ce": self.apgd_ce, "apgd-t": self.apgd_t,
                 "square": self.square, "autoattack": self.autoattack_art, "bb": self.bb}
        return table[name]
