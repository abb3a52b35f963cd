"""The one table of attack names and labels (flags, reports, figures, the reproduction tables), the order check
of an evaluation report, without TensorFlow: ``bcs_tf.robustness.Evaluator`` runs the attacks these name (a test
keeps the two lists equal)."""

from __future__ import annotations

import math
import re

from bcs_run.cli import FlagError

ORDER = ("clean", "fgsm", "pgd50", "pgd100", "autoattack")
# in table order
ATTACK_LABELS = {"clean": "Clean", "fgsm": "FGSM", "pgd50": "PGD-50", "pgd100": "PGD-100", "bb": "B&B∞",
                 "autoattack": "AA∞", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "square": "Square"}
TABLE_ROWS = tuple((label, name) for name, label in ATTACK_LABELS.items())
AA_GAP = 0.10  # AutoAttack this far below PGD-100 is reported as likely gradient masking
ATTACKS = ("clean", "fgsm", "apgd-ce", "apgd-t", "square", "autoattack", "bb")  # and pgdK for any K ≥ 1
ATTACK_NAMES = "clean, fgsm, pgdK (e.g. pgd50), apgd-ce, apgd-t, square, autoattack, bb"
# the attacks whose results depend on the --square / --apgd implementation chosen
VERSION_USERS = {"square": ("square", "autoattack"), "apgd": ("apgd-ce", "apgd-t", "autoattack")}


def pgd_steps(name):
    """K of an attack name ``pgdK``, else None."""
    match = re.fullmatch(r"pgd(\d+)", name)
    return int(match.group(1)) if match else None


def parse_attacks(text):
    """The attack names of ``--attacks``, checked (unknown names and PGD with 0 steps are refused)."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise FlagError(f"--attacks: name at least one of {ATTACK_NAMES}. Received: {text!r}")
    for name in names:
        if name not in ATTACKS and not pgd_steps(name):
            why = "PGD needs at least one step" if pgd_steps(name) == 0 else "unknown attack"
            raise FlagError(f"--attacks: {why} {name!r}; choose from {ATTACK_NAMES}")
    return names


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
