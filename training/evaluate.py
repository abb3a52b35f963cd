"""``python -m training.evaluate RUN_DIR --attacks clean,fgsm,pgd50,pgd100,apgd-ce,apgd-t,autoattack,bb``.

FGSM and PGD are bcs_tf's in-graph attacks (PGD with ``--restarts`` keeps the worst case per example);
APGD-CE, APGD-T, Square and AutoAttack come from the adversarial-robustness-toolbox; the Brendel & Bethge
L∞ attack from foolbox 3. AutoAttack is by default the standard sequence APGD-CE → APGD-T → Square, each run
on the examples that survived the previous ones (``--autoattack art`` uses ART's ``AutoAttack`` class, which runs
a larger, slower set). Writes ``eval.json`` after every attack (``--resume`` continues an interrupted
evaluation) and ``eval.md`` (the rows of the paper's HYDRA table), and checks the order
clean ≥ FGSM ≥ PGD-50 ≥ PGD-100 ≥ AA, warning (and exiting 3 with ``--strict``) on a violation beyond noise or
on AutoAttack far below PGD: both are signs of gradient masking.
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
from bcs_tf.errors import ConfigError, one_line_errors  # noqa: E402
from training.config import load_finished_run  # noqa: E402

ORDER = ("clean", "fgsm", "pgd50", "pgd100", "autoattack")
TABLE_ROWS = (("Clean", "clean"), ("FGSM", "fgsm"), ("PGD-50", "pgd50"), ("PGD-100", "pgd100"),
              ("B&B∞", "bb"), ("AA∞", "autoattack"), ("APGD-CE", "apgd-ce"), ("APGD-T", "apgd-t"))
AA_GAP = 0.10  # AutoAttack this far below PGD-100 is reported as likely gradient masking


AA_STANDARD = ("apgd-ce", "apgd-t", "square")  # AutoAttack's standard set minus FAB-T, which ART lacks
ATTACK_NAMES = "clean, fgsm, pgdK (e.g. pgd50), apgd-ce, apgd-t, square, autoattack, bb"


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
                 verbose=1, bb_steps=1000, autoattack="standard"):
        if autoattack not in ("standard", "art"):
            raise ConfigError(f"--autoattack must be 'standard' or 'art'. Received: {autoattack!r}")
        self.net, self.eps, self.num_classes = InferenceFunction(net), float(eps), num_classes
        self.batch_size, self.restarts, self.seed = batch_size, restarts, seed
        self.square_queries, self.verbose, self.bb_steps = square_queries, verbose, bb_steps
        self.autoattack_version = autoattack
        self._classifiers = {}
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

    def _apgd(self, loss, targeted, max_iter=100):
        from art.attacks.evasion import AutoProjectedGradientDescent

        # loss_type=None: APGD uses the classifier's own loss (ART's DLR loss, vectorised, for "dlr").
        return AutoProjectedGradientDescent(
            self.art_classifier(loss), norm=np.inf, eps=self.eps, eps_step=2 * self.eps, max_iter=max_iter,
            targeted=targeted, nb_random_init=self.restarts, batch_size=self.batch_size, loss_type=None,
            verbose=False)

    def _square(self):
        from art.attacks.evasion import SquareAttack

        return SquareAttack(self.art_classifier(), norm=np.inf, eps=self.eps, max_iter=self.square_queries,
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
            return pgd_restarts(self.predict, xb, yb, self.eps, 2.5 * self.eps / steps, steps,
                                restarts=self.restarts, seed=gen)

        return lambda x, y: np.argmax(self.predict(attack(tf.constant(x), tf.constant(y))), 1) == y

    def apgd_ce(self, x, y):
        x_adv = self._apgd("cross_entropy", False).generate(x, y=y)
        return np.argmax(self.predict(x_adv), 1) == y

    def apgd_t(self, x, y):
        """Targeted APGD-DLR against each of the top-9 wrong classes (as AutoAttack's APGD-T)."""
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
        """ART's Square attack (score-based, no gradients) with ``square_queries`` queries."""
        robust = self.clean(x, y)
        idx = np.flatnonzero(robust)
        if len(idx):
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
        """Accuracy under attack ``name`` on ``(x, y)`` and the seconds it took."""
        if self._outcomes_for is not x:
            self._outcomes, self._outcomes_for = {}, x
        if name == "autoattack" and self.autoattack_version == "standard":
            robust, seconds = self._standard_autoattack(x, y)
        else:
            if self.verbose:
                print(f"{name}:")
            robust, seconds = self._run_batches(self.resolve(name), x, y)
        self._outcomes[name] = robust, seconds
        return float(np.mean(robust)), seconds

    def _run_batches(self, fn, x, y):
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
        robust, seconds = self._outcomes.get("clean") or self._run_batches(self.clean, x, y)
        robust = robust.copy()
        for name in AA_STANDARD:
            if name in self._outcomes:
                outcome, took = self._outcomes[name]
                robust &= outcome
            else:
                idx = np.flatnonzero(robust)
                if self.verbose:
                    print(f"autoattack/{name} on {len(idx)} surviving examples:")
                outcome, took = self._run_batches(self.resolve(name), x[idx], y[idx])
                robust[idx] = outcome
            seconds += took
        return robust, seconds

    def resolve(self, name):
        """The batch function of attack ``name`` (``pgdK`` for any K)."""
        match = re.fullmatch(r"pgd(\d+)", name)
        if match:
            return self.pgd(int(match.group(1)))
        table = {"clean": self.clean, "fgsm": self.fgsm, "apgd-ce": self.apgd_ce, "apgd-t": self.apgd_t,
                 "square": self.square, "autoattack": self.autoattack_art, "bb": self.bb}
        if name not in table:
            raise ConfigError(f"--attacks: unknown attack {name!r}; choose from {ATTACK_NAMES}")
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


@one_line_errors
def main(argv=None):
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--attacks", default="clean,fgsm,pgd50,pgd100,apgd-ce,apgd-t,autoattack,bb",
                   help=f"comma-separated, run in this order: {ATTACK_NAMES}")
    p.add_argument("--restarts", type=int, default=1, help="random restarts for PGD and APGD")
    p.add_argument("--n-examples", type=int, default=None, help="first N test examples (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eps", type=float, default=None, help="default: the run's training eps")
    p.add_argument("--square-queries", type=int, default=5000)
    p.add_argument("--autoattack", choices=("standard", "art"), default="standard",
                   help="standard: APGD-CE → APGD-T → Square on survivors; art: ART's AutoAttack class")
    p.add_argument("--strict", action="store_true", help="exit 3 when the order check fails")
    p.add_argument("--name", default="eval", help="report file stem in the run directory (NAME.json, NAME.md), "
                   "e.g. to keep a costly AutoAttack on fewer examples beside the main evaluation")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace an existing eval.json / eval.md")
    group.add_argument("--resume", action="store_true",
                       help="keep the attacks an existing eval.json (same settings) holds and run the rest")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    return evaluate(p.parse_args(argv))


def _previous_results(out_json, settings):
    """Attack results of an earlier evaluation with the same settings (for ``--resume``)."""
    try:
        report = json.loads(out_json.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: cannot read {out_json} ({exc}); use --overwrite to start afresh") from exc
    differs = {k: (report.get(k), v) for k, v in settings.items() if report.get(k) != v}
    if differs:
        raise ConfigError(f"--resume: {out_json} was made with other settings (saved, now): {differs}; "
                          "use --overwrite to start afresh")
    return report.get("attacks", {})


def evaluate(args):
    """Evaluate a run directory; returns the exit code. ``eval.json`` is rewritten after every attack."""
    run_dir = pathlib.Path(args.run_dir)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        raise ConfigError(f"--name: letters, digits, '_', '.', '-' only. Received: {args.name!r}")
    out_json, out_md = run_dir / f"{args.name}.json", run_dir / f"{args.name}.md"
    if (out_json.exists() or out_md.exists()) and not (args.overwrite or args.resume):
        raise ConfigError(f"{out_json} exists; pass --resume to continue it or --overwrite to replace it")
    if args.restarts < 1 or args.batch_size < 1 or (args.n_examples is not None and args.n_examples < 1):
        raise ConfigError("--restarts, --batch-size and --n-examples must be ≥ 1")
    if args.square_queries < 1:
        raise ConfigError(f"--square-queries must be ≥ 1. Received: {args.square_queries}")
    cfg, net = load_finished_run(run_dir)
    eps = cfg.eps if args.eps is None else args.eps
    if eps < 0:
        raise ConfigError(f"--eps must be ≥ 0. Received: {eps}")
    data = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    ev = Evaluator(net, eps, data.num_classes, args.batch_size, args.restarts, cfg.seed, args.square_queries,
                   args.verbose, autoattack=args.autoattack)
    for name in names:
        ev.resolve(name)  # unknown names fail before any long attack runs
    x, y = data.x_test[: args.n_examples], data.y_test[: args.n_examples]
    settings = {"run_dir": str(run_dir), "eps": eps, "restarts": args.restarts, "n_examples": int(len(x)),
                "square_queries": args.square_queries, "autoattack": args.autoattack}
    results = _previous_results(out_json, settings) if args.resume and out_json.exists() else {}
    for name in names:
        if name in results:
            print(f"{name}: kept from {out_json}")
            continue
        acc, seconds = ev.run(name, x, y)
        results[name] = {"accuracy": acc, "n": int(len(x)), "seconds": seconds,
                         "seconds_per_1000": 1000 * seconds / len(x)}
        _write_report(out_json, out_md, settings, results)
    problems = _write_report(out_json, out_md, settings, results)
    print(out_md.read_text())
    for problem in problems:
        print(f"WARNING (possible gradient masking): {problem}", file=sys.stderr)
    return 3 if problems and args.strict else 0


def _write_report(out_json, out_md, settings, results):
    """Write eval.json and eval.md atomically; returns the order-check problems."""
    problems = order_check(results, settings["n_examples"])
    aa = ("APGD-CE → APGD-T (DLR, top-9 targets) → Square, each on the survivors; FAB-T is not in ART"
          if settings["autoattack"] == "standard" else
          "ART AutoAttack: APGD-CE, APGD-DLR, Square untargeted, then APGD-CE and APGD-DLR against every class")
    report = {**settings, "attacks": results, "order_check": {"ok": not problems, "problems": problems},
              "notes": f"AutoAttack = {aa}"}
    for path, text in ((out_json, json.dumps(report, indent=1)),
                       (out_md, markdown_table(results, settings["eps"], settings["n_examples"]))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return problems


if __name__ == "__main__":
    sys.exit(main())
