"""The one evaluation path: a network's accuracy under named attacks, in batches, with progress bars.

In-graph FGSM/PGD, APGD-CE, APGD-T and Square (ART's APGD and Square behind ``apgd="art"`` / ``square="art"``,
ART's AutoAttack class behind ``autoattack="art"``), foolbox's Brendel & Bethge, and AutoAttack's standard
sequence on the survivors. ``training.evaluate``, the test evaluation at the end of ``training.run``
(:func:`robust_accuracy`) and the export's transfer check (:meth:`Evaluator.pgd_examples`) all run through it.
ART and foolbox are imported only when one of their attacks runs.
"""

from __future__ import annotations

import re
import time

import keras
import numpy as np
import tensorflow as tf

from bcs_tf.errors import ConfigError
from bcs_tf.robustness.apgd import APGD, apgd_targeted, ce_loss, target_classes, targeted_dlr_loss
from bcs_tf.robustness.attacks import default_step_size, fgsm, pgd_restarts
from bcs_tf.robustness.square import SquareAttack

AA_STANDARD = ("apgd-ce", "apgd-t", "square")  # AutoAttack's standard set minus FAB-T, which ART lacks


def pgd_steps(name):
    """K of an attack name ``pgdK``, else None."""
    match = re.fullmatch(r"pgd(\d+)", name)
    return int(match.group(1)) if match else None


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


class Evaluator:
    """Runs named attacks on ``net`` (logits model, inputs in [0, 1]) in batches with progress bars.

    Each attack's per-example outcome on the current test arrays is kept, so AutoAttack reuses APGD-CE and
    APGD-T when they ran before it, exactly as its standard version runs each attack only on the survivors.
    """

    ATTACKS = ("clean", "fgsm", "apgd-ce", "apgd-t", "square", "autoattack", "bb")  # and pgdK for any K ≥ 1

    def __init__(self, net, eps, num_classes, batch_size=256, restarts=1, seed=0, square_queries=5000,
                 verbose=1, bb_steps=1000, autoattack="standard", square="tf", apgd="tf", norm="linf"):
        for flag, value, choices in (("autoattack", autoattack, ("standard", "art")), ("square", square, ("tf", "art")),
                                     ("apgd", apgd, ("tf", "art"))):
            if value not in choices:
                raise ConfigError(f"--{flag} must be {' or '.join(map(repr, choices))}. Received: {value!r}")
        self.square_version, self.apgd_version = square, apgd
        self.net, self.eps, self.num_classes = InferenceFunction(net), float(eps), num_classes
        self.batch_size, self.restarts, self.seed, self.norm = batch_size, restarts, seed, norm
        self.square_queries, self.verbose, self.bb_steps = square_queries, verbose, bb_steps
        self.autoattack_version = autoattack
        self._classifiers, self._apgd_tf = {}, {}
        self._outcomes, self._outcomes_for = {}, None

    def predict(self, x):
        """Logits in inference mode."""
        return self.net(x)

    def _correct(self, x, y):
        return np.argmax(self.predict(x), 1) == y

    def art_classifier(self, loss="cross_entropy"):
        """The network wrapped for ART with ``loss`` ("cross_entropy" or "dlr"), built once each."""
        import bcs_tf.robustness.art as art

        if loss not in self._classifiers:
            self._classifiers[loss] = art.classifier(self.net, self.num_classes, loss)
        return self._classifiers[loss]

    def _art_apgd(self, loss, targeted):
        import bcs_tf.robustness.art as art

        return art.apgd(self.art_classifier(loss), self.eps, targeted, self.restarts, self.batch_size)

    def _art_square(self):
        import bcs_tf.robustness.art as art

        return art.square(self.art_classifier(), self.eps, self.square_queries, self.batch_size)

    def _apgd_in_graph(self, loss, restart):
        """bcs_tf's APGD with ``loss`` for random start ``restart``, built (and traced) once."""
        key = (loss, restart)
        if key not in self._apgd_tf:
            self._apgd_tf[key] = APGD(self.predict, self.eps, loss=loss, seed=self.seed + restart)
        return self._apgd_tf[key]

    def _on_survivors(self, attack, x, y, passes, among=None):
        """Still-correct booleans after ``attack(idx, p)`` (the still-correct booleans of ``x[idx]``) ran once per
        pass ``p`` (a random restart, a target rank), each time on the examples no earlier pass broke (and, with
        ``among``, only on those it marks)."""
        robust = self.clean(x, y)
        for p in passes:
            idx = np.flatnonzero(robust if among is None else robust & among)
            if not len(idx):
                break
            robust[idx] = attack(idx, p)
        return robust

    # Each attack maps a batch (x, y) to a boolean array: still correctly classified.
    def clean(self, x, y):
        """The batch function of clean accuracy."""
        return self._correct(x, y)

    def fgsm(self, x, y):
        """The batch function of FGSM (one signed-gradient step of size ε)."""
        return self._correct(fgsm(self.predict, x, y, self.eps, norm=self.norm), y)

    def pgd(self, steps):
        """The batch function of PGD-``steps`` (step 2.5·ε/steps, ``restarts`` random starts, the worst kept)."""
        attack = self._pgd_attack(steps)
        return lambda x, y: self._correct(attack(tf.constant(x, tf.float32), tf.constant(y)), y)

    def _pgd_attack(self, steps):
        gen = keras.random.SeedGenerator(self.seed)

        @tf.function(reduce_retracing=True)
        def attack(xb, yb):
            return pgd_restarts(self.predict, xb, yb, self.eps, default_step_size(self.eps, steps), steps,
                                restarts=self.restarts, norm=self.norm, seed=gen)

        return attack

    def pgd_examples(self, x, y, steps):
        """PGD-``steps`` adversarial examples of all of ``x`` (e.g. to transfer to an exported file)."""
        attack = self._pgd_attack(steps)
        return np.concatenate([np.asarray(attack(tf.constant(x[i:i + self.batch_size], tf.float32),
                                                 tf.constant(np.asarray(y[i:i + self.batch_size], np.int32))))
                               for i in range(0, len(x), self.batch_size)])

    def apgd_ce(self, x, y):
        """APGD with cross-entropy, 100 iterations, ``restarts`` random starts."""
        if self.apgd_version == "tf":
            return self._on_survivors(lambda idx, r: self._apgd_in_graph(ce_loss, r)(x[idx], y[idx]), x, y,
                                      range(self.restarts))
        return self._correct(self._art_apgd("cross_entropy", False).generate(x, y=y), y)

    def apgd_t(self, x, y):
        """Targeted APGD-DLR against each of the top-9 wrong classes (as AutoAttack's APGD-T)."""
        if self.apgd_version == "tf":
            return self._on_survivors(
                lambda idx, r: apgd_targeted(self.predict, x[idx], y[idx], self.eps, batch_size=self.batch_size,
                                             attack=self._apgd_in_graph(targeted_dlr_loss, r)), x, y,
                range(self.restarts))
        attack = self._art_apgd("dlr", True)
        targets = target_classes(self.predict(x), y, min(9, self.num_classes - 1))
        return self._on_survivors(lambda idx, rank: self._correct(attack.generate(x[idx], y=targets[idx, rank]),
                                                                   y[idx]), x, y, range(targets.shape[1]))

    def square(self, x, y):
        """Square attack (score-based, no gradients) with ``square_queries`` queries: bcs_tf's in-graph one, or
        ART's with ``square="art"``."""
        if self.square_version == "tf":
            attack = lambda xs, ys: SquareAttack(self.predict, self.eps, self.square_queries,  # noqa: E731
                                                 seed=self.seed)(xs, ys)
        else:
            attack = lambda xs, ys: self._art_square().generate(xs, y=ys)  # noqa: E731
        return self._on_survivors(lambda idx, _: self._correct(attack(x[idx], y[idx]), y[idx]), x, y, [0])

    def autoattack_art(self, x, y):
        """ART's AutoAttack class: APGD-CE, APGD-DLR and Square untargeted, then APGD-CE and APGD-DLR against
        every other class (a superset of the standard set, and slower)."""
        import bcs_tf.robustness.art as art

        attacks = [self._art_apgd("cross_entropy", False), self._art_apgd("dlr", True), self._art_square()]
        return self._correct(art.autoattack(self.art_classifier(), attacks, self.eps, self.batch_size)
                             .generate(x, y=y), y)

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

        def attack(idx, _):
            fmodel = foolbox.TensorFlowModel(self.net, bounds=(0.0, 1.0))
            # int64 labels: eagerpy's dtype promotion uses an API numpy 2 removed.
            _, _, success = foolbox.attacks.LinfinityBrendelBethgeAttack(steps=self.bb_steps)(
                fmodel, tf.constant(x[idx]), tf.constant(y[idx].astype(np.int64)), epsilons=self.eps,
                starting_points=tf.constant(starts[idx]))
            return ~np.asarray(success)

        return self._on_survivors(attack, x, y, [0], among=has_start)

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
        if name not in table:
            raise ConfigError(f"unknown attack {name!r}; choose from {', '.join(self.ATTACKS)} or pgdK")
        return table[name]


def robust_accuracy(net, x, y, eps, steps, restarts=1, norm="linf", batch_size=256, seed=0, verbose=1):
    """``(clean accuracy, PGD-``steps`` accuracy)`` of ``net`` on ``(x, y)`` (step 2.5·ε/steps from a random
    start, ``restarts`` times, the worst case kept per example); with no steps or ε = 0 both are the clean one."""
    ev = Evaluator(net, eps, None, batch_size, restarts, seed, verbose=verbose, norm=norm)
    clean, _ = ev.run("clean", x, y)
    if steps <= 0 or eps <= 0:
        return clean, clean
    return clean, ev.run(f"pgd{steps}", x, y)[0]
