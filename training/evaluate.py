"""``python -m training.evaluate RUN_DIR --attacks clean,fgsm,pgd50,pgd100,apgd-ce,apgd-t,autoattack,bb``.

FGSM and PGD are bcs_tf's in-graph attacks (PGD with ``--restarts`` keeps the worst case per example);
APGD-CE, APGD-T, AutoAttack and Square come from the adversarial-robustness-toolbox; the Brendel & Bethge
L∞ attack from foolbox 3. Writes ``eval.json`` and ``eval.md`` (the rows of the paper's HYDRA table) and checks
the order clean ≥ FGSM ≥ PGD-50 ≥ PGD-100 ≥ AA, warning (and exiting 3 with ``--strict``) on a violation
beyond noise or on AutoAttack far below PGD: both are signs of gradient masking.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# ART's import runs logging.config.dictConfig, which closes every logging handler that exists at that moment
# (absl's closes its stream when that is not the current sys.stderr): import it here, once, up front.
from art.estimators.classification import TensorFlowV2Classifier  # noqa: E402

import bcs_tf  # noqa: E402,F401  (registers the sparse layers)
from bcs_tf.attacks import fgsm, pgd_restarts  # noqa: E402
from bcs_tf.data import load_dataset  # noqa: E402
from bcs_tf.errors import BcsError, ConfigError  # noqa: E402
from training.config import load_finished_run  # noqa: E402

ORDER = ("clean", "fgsm", "pgd50", "pgd100", "autoattack")
TABLE_ROWS = (("Clean", "clean"), ("FGSM", "fgsm"), ("PGD-50", "pgd50"), ("PGD-100", "pgd100"),
              ("B&B∞", "bb"), ("AA∞", "autoattack"), ("APGD-CE", "apgd-ce"), ("APGD-T", "apgd-t"))
AA_GAP = 0.10  # AutoAttack this far below PGD-100 is reported as likely gradient masking


class Evaluator:
    """Runs named attacks on ``net`` (logits model, inputs in [0, 1]) in batches with progress bars."""

    def __init__(self, net, eps, num_classes, batch_size=256, restarts=1, seed=0, square_queries=5000,
                 verbose=1, bb_steps=1000):
        self.net, self.eps, self.num_classes = net, float(eps), num_classes
        self.batch_size, self.restarts, self.seed = batch_size, restarts, seed
        self.square_queries, self.verbose, self.bb_steps = square_queries, verbose, bb_steps
        self._art = None

    def predict(self, x):
        """Logits in inference mode."""
        return self.net(x, training=False)

    def art_classifier(self):
        """The network wrapped for ART (built once)."""
        if self._art is None:

            self._art = TensorFlowV2Classifier(
                model=self.net, nb_classes=self.num_classes, input_shape=tuple(self.net.input_shape[1:]),
                loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True), clip_values=(0.0, 1.0))
        return self._art

    def _apgd(self, loss_type, targeted, max_iter=100):
        from art.attacks.evasion import AutoProjectedGradientDescent

        return AutoProjectedGradientDescent(
            self.art_classifier(), norm=np.inf, eps=self.eps, eps_step=2 * self.eps, max_iter=max_iter,
            targeted=targeted, nb_random_init=self.restarts, batch_size=self.batch_size, loss_type=loss_type,
            verbose=False)

    # Each attack maps a batch (x, y) to a boolean array: still correctly classified.
    def clean(self, x, y):
        return np.argmax(self.predict(x), 1) == y

    def fgsm(self, x, y):
        return np.argmax(self.predict(fgsm(self.predict, x, y, self.eps)), 1) == y

    def pgd(self, steps):
        gen = keras.random.SeedGenerator(self.seed)

        @tf.function(reduce_retracing=True)
        def attack(xb, yb):
            return pgd_restarts(self.predict, xb, yb, self.eps, 2.5 * self.eps / steps, steps,
                                restarts=self.restarts, seed=gen)

        return lambda x, y: np.argmax(self.predict(attack(tf.constant(x), tf.constant(y))), 1) == y

    def apgd_ce(self, x, y):
        x_adv = self._apgd("cross_entropy", False).generate(x, y=y)
        return np.argmax(self.predict(x_adv), 1) == y

    def apgd_t(self, x, y):
        """Targeted APGD-DLR against each of the top-9 wrong classes (as AutoAttack's APGD-T)."""
        attack = self._apgd("difference_logits_ratio", True)
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

    def autoattack(self, x, y):
        """ART AutoAttack with APGD-CE, APGD-T (DLR, every target) and Square; FAB-T is not in ART."""
        from art.attacks.evasion import AutoAttack, SquareAttack

        square = SquareAttack(self.art_classifier(), norm=np.inf, eps=self.eps, max_iter=self.square_queries,
                              nb_restarts=1, batch_size=self.batch_size, verbose=False)
        attacks = [self._apgd("cross_entropy", False), self._apgd("difference_logits_ratio", True), square]
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
        """Accuracy under attack ``name`` and the seconds it took."""
        fn = self.resolve(name)
        bar = keras.utils.Progbar(len(x), verbose=self.verbose, stateful_metrics=["acc"])
        correct, start = 0, time.time()
        for i in range(0, len(x), self.batch_size):
            xb, yb = x[i:i + self.batch_size], y[i:i + self.batch_size]
            correct += int(np.sum(fn(xb, yb)))
            done = min(i + self.batch_size, len(x))
            bar.update(done, [("acc", correct / done)])
        return correct / len(x), time.time() - start

    def resolve(self, name):
        """The batch function of attack ``name`` (``pgdK`` for any K)."""
        match = re.fullmatch(r"pgd(\d+)", name)
        if match:
            return self.pgd(int(match.group(1)))
        table = {"clean": self.clean, "fgsm": self.fgsm, "apgd-ce": self.apgd_ce, "apgd-t": self.apgd_t,
                 "autoattack": self.autoattack, "bb": self.bb}
        if name not in table:
            raise ConfigError(f"--attacks: unknown attack {name!r}; choose from clean, fgsm, pgdK (e.g. pgd50), "
                              "apgd-ce, apgd-t, autoattack, bb")
        return table[name]


def order_check(results, n):
    """Violations of clean ≥ FGSM ≥ PGD-50 ≥ PGD-100 ≥ AA beyond noise, and AA far below PGD-100."""
    present = [(k, results[k]["accuracy"]) for k in ORDER if k in results]
    problems = []
    for (weak, a_weak), (strong, a_strong) in zip(present, present[1:]):
        p = max(a_weak, a_strong)
        noise = max(0.005, 2 * math.sqrt(p * (1 - p) / max(n, 1)))
        if a_strong > a_weak + noise:
            problems.append(f"{strong} accuracy {a_strong:.4f} exceeds {weak} {a_weak:.4f} by more than noise "
                            f"({noise:.4f})")
    if "autoattack" in results and "pgd100" in results:
        gap = results["pgd100"]["accuracy"] - results["autoattack"]["accuracy"]
        if gap > AA_GAP:
            problems.append(f"AutoAttack is {gap:.3f} below PGD-100: gradient-based attacks are being fooled")
    return problems


def markdown_table(results, eps, n):
    """The paper's HYDRA-comparison rows (those evaluated), with time per 1000 examples."""
    lines = [f"| attack (ε = {eps:g}, n = {n}) | accuracy | s / 1000 examples |", "|---|---|---|"]
    for label, key in TABLE_ROWS:
        if key in results:
            r = results[key]
            lines.append(f"| {label} | {100 * r['accuracy']:.2f}% | {r['seconds_per_1000']:.1f} |")
    for key in results:
        if key not in {k for _, k in TABLE_ROWS}:
            r = results[key]
            lines.append(f"| {key} | {100 * r['accuracy']:.2f}% | {r['seconds_per_1000']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--attacks", default="clean,fgsm,pgd50,pgd100,apgd-ce,apgd-t,autoattack,bb")
    p.add_argument("--restarts", type=int, default=1, help="random restarts for PGD and APGD")
    p.add_argument("--n-examples", type=int, default=None, help="first N test examples (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eps", type=float, default=None, help="default: the run's training eps")
    p.add_argument("--square-queries", type=int, default=5000)
    p.add_argument("--strict", action="store_true", help="exit 3 when the order check fails")
    p.add_argument("--overwrite", action="store_true", help="replace an existing eval.json / eval.md")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    args = p.parse_args(argv)
    try:
        return evaluate(args)
    except BcsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def evaluate(args):
    """Evaluate a run directory; returns the exit code."""
    run_dir = pathlib.Path(args.run_dir)
    out_json, out_md = run_dir / "eval.json", run_dir / "eval.md"
    if (out_json.exists() or out_md.exists()) and not args.overwrite:
        raise ConfigError(f"{out_json} exists; pass --overwrite to replace it")
    if args.restarts < 1 or args.batch_size < 1 or (args.n_examples is not None and args.n_examples < 1):
        raise ConfigError("--restarts, --batch-size and --n-examples must be ≥ 1")
    cfg, net = load_finished_run(run_dir)
    eps = cfg.eps if args.eps is None else args.eps
    if eps < 0:
        raise ConfigError(f"--eps must be ≥ 0. Received: {eps}")
    data = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
    x, y = data.x_test[: args.n_examples], data.y_test[: args.n_examples]
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    ev = Evaluator(net, eps, data.num_classes, args.batch_size, args.restarts, cfg.seed, args.square_queries,
                   args.verbose)
    for name in names:
        ev.resolve(name)  # unknown names fail before any long attack runs
    results = {}
    for name in names:
        print(f"{name}:")
        acc, seconds = ev.run(name, x, y)
        results[name] = {"accuracy": acc, "n": int(len(x)), "seconds": seconds,
                         "seconds_per_1000": 1000 * seconds / len(x)}
    problems = order_check(results, len(x))
    report = {"run_dir": str(run_dir), "eps": eps, "restarts": args.restarts, "attacks": results,
              "order_check": {"ok": not problems, "problems": problems},
              "notes": "AutoAttack = ART APGD-CE + APGD-T (DLR, all targets) + Square; FAB-T is not in ART"}
    out_json.write_text(json.dumps(report, indent=1))
    table = markdown_table(results, eps, len(x))
    out_md.write_text(table)
    print(table)
    for problem in problems:
        print(f"WARNING (possible gradient masking): {problem}", file=sys.stderr)
    return 3 if problems and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
