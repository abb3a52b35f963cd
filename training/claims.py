"""The two papers' claims, each measured as a **paired** difference over seeds with a 95% interval and a verdict.

Runs of one seed share their initialisation seed and data order, so the difference between two methods is
taken seed by seed and its mean gets a Student-t interval with n − 1 degrees of freedom. The verdict follows
from the interval alone:

- a superiority claim "A > B" is *held* when the interval lies above 0, *contradicted* when it lies below 0,
  and *not shown* otherwise;
- a closeness claim "A within m points of B" (A − B ≥ −m) is *held* when the interval lies above −m,
  *contradicted* when it lies below −m, and *not shown* otherwise.

With one seed nothing is shown. Each claim is measured under the papers' protocol and, where the budgets
differ, again with compute-matched controls; the rows say which, with every run's epochs in all.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bcs_run.attacks import AA_GAP
from bcs_run.rundir import atomic_write
from training.plan import SPARSITIES, sparsity_group

ATTACKS = (("clean", "clean"), ("pgd50", "PGD-50"), ("autoattack", "AA"),
           ("fgsm-pgd50", "FGSM − PGD-50 gap"), ("pgd50-pgd100", "PGD-50 − PGD-100 gap"),
           ("pgd50-bb", "PGD-50 − B&B gap"), ("pgd50-autoattack", "PGD-50 − AA gap"))
MASKING_GAPS = ("fgsm-pgd50", "pgd50-pgd100", "pgd50-bb", "pgd50-autoattack")

MASKING_NOTE = ("the paper's sign on WRN-28-4 (HYDRA 90%): FGSM 88.8 vs PGD-50 43.9 vs PGD-100 38.3 vs B&B 36.5 "
                "(BCS: 70.0, 55.6, 55.1, 52.1); on every objective and sparsity, a gap measures how far a weaker "
                "attack overrates the network, which masking causes but does not alone prove; each gap compares one "
                "image set: FGSM − PGD-50 and PGD-50 − PGD-100 on all test images, PGD-50 − B&B and PGD-50 − AA on "
                "AutoAttack's first ones (eval_aa.json repeats PGD-50 there)")


@dataclasses.dataclass
class Claim:
    """``a − b`` (groups of runs) under each attack; ``margin`` None for "a > b", else "a ≥ b − margin"."""

    paper: str
    text: str
    a: str
    b: str
    margin: float | None = None
    protocol: str = "papers'"
    attacks: tuple = ("clean", "pgd50", "autoattack")
    note: str = ""


def by_seed(results, group, quantity):
    """``{seed: points}`` of an attack's accuracy, or of the gap ``"x-y"`` between two attacks, e.g.
    ``"fgsm-pgd50"``: a one-step attack far above a many-step one signals gradient masking. Each attack is read
    where :class:`training.tables.Results` finds it (eval.json, else eval_aa.json on the first test images); a
    gap's two attacks from the one report that holds both."""
    if "-" not in quantity:
        return results.by_seed(group, quantity)
    return results.gap_by_seed(group, *quantity.split("-"))


def paired(results, a, b, attack):
    """``(n, mean, low, high)`` of the per-seed differences a − b in points (low/high None for n < 2), or None."""
    from scipy import stats

    va, vb = by_seed(results, a, attack), by_seed(results, b, attack)
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return None
    d = np.array([va[s] - vb[s] for s in seeds])
    if len(d) < 2:
        return len(d), float(d.mean()), None, None
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return len(d), float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def verdict(measured, margin=None):
    """held / not shown / contradicted, from the interval (see the module docstring)."""
    if measured is None:
        return "not run"
    n, _, low, high = measured
    if low is None:
        return f"not shown ({n} seed)"
    bound = 0.0 if margin is None else -margin
    if low > bound:
        return "held"
    if high < bound:
        return "contradicted"
    return "not shown"


def bcs_claims(results, objectives, matched):
    """The BCS paper's claims on the BCS table, per robust objective."""
    claims = []
    m = f"_e{matched}" if matched else None
    for o in objectives:
        name = {"at": "AT", "trades": "TRADES", "mat": "mixed-batch AT", "mart": "MART"}.get(o, o)
        for c, pct in (("0.01", "99%"), ("0.1", "90%")):
            rows = [("BCS > Fixed", "bcs", "fixed", None, ""), ("Fixed > Random", "fixed", "random", None, ""),
                    ("BCS > Random", "bcs", "random", None, "")]
            if c == "0.1":  # the paper: BCS ≥ Fixed ≥ Random at 90% (read with a 1-point margin)
                rows = [("BCS ≥ Fixed (within 1 point)", "bcs", "fixed", 1.0, ""),
                        ("Fixed ≥ Random (within 1 point)", "fixed", "random", 1.0, ""),
                        ("BCS within 3 points of dense", "bcs", "dense", 3.0, "")]
            for text, x, y, margin, note in rows:
                def group(method, tag=""):
                    if method == "dense":
                        return f"{o}/dense{tag}"
                    return f"{o}/{method}_c{c}" + ("" if method == "fixed" else tag)
                claims.append(Claim("BCS", f"{name} {pct}: {text}", group(x), group(y), margin, note=note))
                if m:
                    claims.append(Claim("BCS", f"{name} {pct}: {text}", group(x, m), group(y, m), margin,
                                        protocol=f"matched ({matched} epochs)"))
    if "natural" in results.plan.p["bcs_objectives"]:
        # The paper's collapse (VGG-16: Random 56.9 vs dense 93.2, Fixed 86.2, BCS 87.7) is Random far below both
        # dense and the learned topologies; a drop from dense that BCS and Fixed share is sparsity, not collapse.
        for text, a in (("below dense (dense − Random, clean)", "natural/dense"),
                        ("below BCS (BCS − Random, clean)", "natural/bcs_c0.01"),
                        ("below Fixed (Fixed − Random, clean)", "natural/fixed_c0.01")):
            claims.append(Claim("BCS", f"natural training 99%: Random collapses, {text}", a, "natural/random_c0.01",
                                None, attacks=("clean",),
                                note="small_cnn's fc1 holds 94% of the weights, so a random 1% keeps every layer "
                                "connected; the paper's collapse is on VGG/WRN"))
    return claims


def hydra_claims(matched):
    """BCS vs HYDRA (its own per-layer k), on the HYDRA table."""
    claims = []
    for o, name in (("at", "AT"), ("trades", "TRADES")):
        for c, pct, margin, text in (("0.1", "90%", 1.0, "BCS ≈ HYDRA (BCS within 1 point)"),
                                     ("0.01", "99%", None, "BCS > HYDRA")):
            claims.append(Claim("BCS", f"{name} {pct}: {text}", f"{o}/bcs_c{c}", f"{o}/hydra_c{c}", margin,
                                attacks=("clean", "pgd50", "autoattack")))
            if matched:
                claims.append(Claim("BCS", f"{name} {pct}: {text}", f"{o}/bcs_c{c}_e{matched}", f"{o}/hydra_c{c}",
                                    margin, protocol=f"matched ({matched} epochs; HYDRA {matched + 1})",
                                    attacks=("clean", "pgd50", "autoattack")))
            claims.append(Claim("BCS", f"{name} {pct}: HYDRA's gradient-masking signs exceed BCS's (HYDRA − BCS gap)",
                                f"{o}/hydra_c{c}", f"{o}/bcs_c{c}", attacks=MASKING_GAPS,
                                note=MASKING_NOTE if (o, c) == ("at", "0.1") else ""))
    return claims


def sparsity_claims(results):
    """Wang et al.'s claims (and "BCS above the pruning methods across sparsities") on the sparsity table."""
    p = results.plan.p
    e = p["sparsity_epochs"]
    g = lambda method, s, matched=False: sparsity_group(method, s, e, matched)  # noqa: E731
    claims = []
    for s in SPARSITIES[1:]:
        pct = f"{100 * s:g}%"
        claims += [
            Claim("Wang", f"{pct}: sparse (Fixed) more robust than dense", g("fixed", s), g("dense", 0),
                  attacks=("pgd50", "autoattack")),
            Claim("Wang", f"{pct}: lottery rewinding > re-initialisation (same masks)", g("lottery", s),
                  g("lottery_reinit", s), attacks=("pgd50", "autoattack")),
            Claim("Wang", f"{pct}: rewinding to epoch 1 > epoch 0", g("lottery", s), g("lottery_rw0", s),
                  attacks=("pgd50",)),
            Claim("BCS", f"{pct}: BCS > Fixed", g("bcs", s), g("fixed", s), attacks=("pgd50", "autoattack")),
            Claim("BCS", f"{pct}: BCS > HYDRA", g("bcs", s), g("hydra", s), attacks=("pgd50", "autoattack")),
            Claim("BCS", f"{pct}: BCS > lottery ticket", g("bcs", s), g("lottery", s),
                  attacks=("pgd50", "autoattack")),
        ]
        if p.get("matched"):
            claims += [
                Claim("Wang", f"{pct}: sparse (Fixed) more robust than dense", g("fixed", s), g("dense", 0, True),
                      protocol=f"matched (dense {2 * e} epochs)", attacks=("pgd50", "autoattack")),
                Claim("BCS", f"{pct}: BCS > Fixed", g("bcs", s, True), g("fixed", s),
                      protocol=f"matched ({2 * e} epochs)", attacks=("pgd50", "autoattack")),
            ]
            # HYDRA's score epoch and the ticket's intermediate rounds stay on top of Fixed's budget.
            claims += [Claim("BCS", f"{pct}: BCS > {name}", g("bcs", s, True), g(method, s),
                             protocol=f"matched ({2 * e} epochs; {name} {results.epochs(g(method, s))})",
                             attacks=("pgd50", "autoattack"))
                       for name, method in (("HYDRA", "hydra"), ("lottery ticket", "lottery"))]
    for c, pct in (("0.1", "90%"), ("0.01", "99%")):
        claims.append(Claim("Wang", f"{pct}: adversarial pruning > natural pruning (mask and weights from an AT vs a "
                            "naturally trained dense network, both then AT)", f"at/fixed_c{c}_e{e}",
                            f"at/fixed_c{c}_natsrc_e{e}", attacks=("clean", "pgd50", "autoattack")))
    claims.append(Claim("Wang", "IWI > plain AT of the large network", f"at/iwi_x2_e{e}", f"at/dense_x2_e{e}",
                        attacks=("clean", "pgd50")))
    if p.get("matched"):
        claims.append(Claim("Wang", "IWI > plain AT of the large network", f"at/iwi_x2_e{e}",
                            f"at/dense_x2_e{2 * e}", protocol=f"matched (plain AT {2 * e} epochs)",
                            attacks=("clean", "pgd50")))
    return claims


def _fmt(value):
    return "—" if value is None else f"{round(value, 1) or 0.0:+.1f}"  # or: no "-0.0"


def measure(results, claims):
    """``[(claim, {attack: paired(...)})]`` for the claims whose runs are planned, each interval computed once for
    both tables of claims.md."""
    return [(claim, {attack: paired(results, claim.a, claim.b, attack) for attack in claim.attacks})
            for claim in claims if claim.a in results.groups and claim.b in results.groups]


def claims_table(results, measured_claims):
    """Markdown rows of :func:`measure`'s claims: claim, protocol, runs (epochs in all), attack, seeds, mean
    difference, 95% interval, verdict."""
    lines = ["| claim | protocol | A − B (epochs in all) | attack | seeds | A − B (points) | 95% CI | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    labels = dict(ATTACKS)
    for claim, by_attack in measured_claims:
        runs = f"{claim.a} ({results.epochs(claim.a)}) − {claim.b} ({results.epochs(claim.b)})"
        for attack, measured in by_attack.items():
            if measured is None:
                continue
            n, mean, low, high = measured
            ci = "—" if low is None else f"[{low:+.1f}, {high:+.1f}]"
            lines.append(f"| {claim.text} | {claim.protocol} | {runs} | {labels[attack]} | {n} | {_fmt(mean)} | "
                         f"{ci} | {verdict(measured, claim.margin)} |")
    return lines


def claims_summary(results, measured_claims):
    """Markdown tables with one row a claim of :func:`measure` under one protocol: each attack's mean difference
    and 95% interval, and the verdicts (one table per set of attacks, so that the columns line up)."""
    labels = dict(ATTACKS)
    tables = {}
    for claim, measured in measured_claims:
        if not any(measured.values()):
            continue
        cells, verdicts = [], {}
        for attack, m in measured.items():
            cells.append("—" if m is None else _fmt(m[1]) + ("" if m[2] is None else f" [{m[2]:+.1f}, {m[3]:+.1f}]"))
            if m is not None:
                verdicts.setdefault(verdict(m, claim.margin), []).append(labels[attack])
        said = "; ".join(v if len(verdicts) == 1 else f"{v}: {', '.join(a)}" for v, a in verdicts.items())
        seeds = max(m[0] for m in measured.values() if m)
        tables.setdefault(claim.attacks, []).append(
            f"| {claim.text} | {claim.protocol} | {results.epochs(claim.a)} vs {results.epochs(claim.b)} | {seeds} | "
            + " | ".join(cells) + f" | {said} |")
    lines = []
    for attacks, rows in tables.items():
        heads = " | ".join(labels[a] for a in attacks)
        lines += [f"| claim | protocol | epochs A vs B | seeds | {heads} | verdict |",
                  "|---|---|---|---|" + "---|" * (len(attacks) + 1), *rows, ""]
    return lines


AA_IMAGES_FIRST = ("eval_aa", "eval")  # an attack repeated on AutoAttack's images is compared with it there
SQUARE_GAP = 0.05  # the black-box Square finding this much more after APGD-CE and APGD-T: gradients mislead


def masking_check(results):
    """Markdown lines on the runs with AutoAttack whose PGD numbers overrate them: AutoAttack more than
    ``AA_GAP`` below PGD-50 (on AutoAttack's images where its report repeats PGD-50, else on all test images), or
    Square taking more than ``SQUARE_GAP`` after the two gradient attacks. Signs of gradient masking, run by run."""
    rows, checked = [], 0
    for rid in results.plan.runs:
        aa = results.report(rid, "eval_aa")
        if not aa or "autoattack" not in aa.get("attacks", {}):
            continue
        pgd = results.value(rid, "pgd50", AA_IMAGES_FIRST)
        if pgd is None:
            continue
        checked += 1
        after = aa["attacks"]["autoattack"].get("after", {})
        square = after["apgd-t"] - after["square"] if {"apgd-t", "square"} <= after.keys() else 0.0
        value = aa["attacks"]["autoattack"]["accuracy"]
        if pgd - value > AA_GAP or square > SQUARE_GAP:
            parts = " → ".join(f"{100 * after[k]:.1f}" for k in ("clean", "apgd-ce", "apgd-t", "square") if k in after)
            fgsm = results.value(rid, "fgsm", AA_IMAGES_FIRST)
            rows.append(f"| {rid} | {'—' if fgsm is None else f'{100 * fgsm:.1f}'} | {100 * pgd:.1f} | "
                        f"{100 * value:.1f} | {parts} |")
    lines = [f"{checked} runs with AutoAttack checked: a run is listed when AutoAttack lies more than "
             f"{100 * AA_GAP:g} points below its PGD-50 or the black-box Square takes more than {100 * SQUARE_GAP:g} "
             "points after APGD-CE and APGD-T — signs that its gradients mislead the attacks (its PGD numbers "
             "overrate it; AA is the number to read)."]
    if rows:
        lines += ["", "| run | FGSM | PGD-50 | AA | AA's parts: clean → APGD-CE → APGD-T → Square |",
                  "|---|---|---|---|---|", *rows]
    else:
        lines.append("None is listed.")
    return lines


def all_claims(results, tables):
    """The claims the requested tables can measure."""
    p = results.plan.p
    matched = 2 * p["epochs"] if p.get("matched") else None
    claims = []
    if "bcs" in tables:
        claims += bcs_claims(results, [o for o in p["bcs_objectives"] if o != "natural"], matched)
    if "hydra" in tables:
        claims += hydra_claims(matched)
    if "sparsity" in tables:
        claims += sparsity_claims(results)
    return claims


def write_claims(results, tables, path):
    """``claims.md``: every claim the tables can measure, with its paired interval and verdict; returns ``path``."""
    n = results.n_examples()
    n_aa = results.n_examples("eval_aa")
    claims = all_claims(results, tables)
    notes = {}
    for c in claims:  # a note shared by several claims is given once, with the first of them
        if c.note:
            notes.setdefault(c.note, f"- {c.text}: {c.note}")
    lines = ["# The papers' claims, measured", "",
             f"{results.plan.dataset}, small_cnn. Paired differences A − B in accuracy points, seed by seed (same "
             f"initialisation seed and data order), mean and Student-t 95% interval; clean and PGD-50 on {n} test "
             f"images, AA on {n_aa}. Verdict: held (interval above 0, or above −margin for a \"within\" claim), "
             "contradicted (below it), not shown (across it, or one seed). Rows appear as their runs finish.", "",
             "## Claim by claim", ""]
    measured = measure(results, claims)
    lines += claims_summary(results, measured)
    lines += ["## Every attack, with its runs", ""]
    lines += claims_table(results, measured)
    if notes:
        lines += ["", "Notes:", *notes.values()]
    lines += ["", "## Gradient-masking check", ""] + masking_check(results)
    atomic_write(path, "\n".join(lines) + "\n")
    return path
