"""Tables and figures of ``training.reproduce`` from the runs' ``metrics.json``, ``eval.json`` and ``eval_aa.json``.

Cells are accuracies in % on the evaluated test images, ``mean ± std`` over seeds when there are several; a
run that has not finished (or not been evaluated) shows as ``—``. Every cell says how many epochs its runs
trained in all (a source run's epochs included), so runs of different budgets are never compared unlabelled.
The comparisons themselves (paired differences with intervals and verdicts) are in :mod:`training.claims`.
"""

from __future__ import annotations

import re

import numpy as np

from bcs_run.attacks import TABLE_ROWS
from bcs_run.rundir import RunDir, atomic_write
from training.claims import write_claims
from training.plan import SPARSITIES, SPARSITY_METHODS, sparsity_group

ATTACK_ROWS = TABLE_ROWS[:6]  # the HYDRA table's rows: clean to AutoAttack
OBJECTIVE_NAMES = {"natural": "Natural training", "at": "Standard AT (Madry)", "mat": "Mixed-batch AT",
                   "trades": "TRADES", "mart": "MART"}
SPARSITY_LABELS = {"fixed": "Fixed (one-shot adversarial pruning)", "lottery": "lottery ticket (rewind to epoch 1)",
                   "lottery_rw0": "lottery ticket (rewind to epoch 0)",
                   "lottery_reinit": "lottery re-init (the epoch-1 ticket's masks, fresh start)", "bcs": "BCS",
                   "hydra": "HYDRA"}
REPORTS = ("eval", "eval_aa")  # where an attack's accuracy is looked up, in this order


class Results:
    """Accuracies of the planned runs, grouped over seeds (a group is a run id without its ``_sN``)."""

    def __init__(self, the_plan, runs_dir):
        self.plan, self.runs_dir = the_plan, runs_dir
        self.groups = {}
        for rid in the_plan.runs:
            self.groups.setdefault(group_of(rid), []).append(rid)

    def report(self, rid, name):
        """The parsed ``NAME.json`` of run ``rid``, or None."""
        return RunDir(self.runs_dir / rid).report(name)

    def value(self, rid, attack, reports=REPORTS):
        """Accuracy (fraction) of run ``rid`` under ``attack`` from the first of ``reports`` that has it, or None."""
        found = self.in_one_report(rid, (attack,), reports)
        return None if found is None else found[0]

    def in_one_report(self, rid, attacks, reports=REPORTS):
        """Accuracies (fractions) of run ``rid`` under ``attacks``, all from the first of ``reports`` that holds
        every one of them (so on one set of test images), or None."""
        for name in reports:
            found = (self.report(rid, name) or {}).get("attacks", {})
            if all(a in found for a in attacks):
                return [found[a]["accuracy"] for a in attacks]
        return None

    def by_seed(self, group, attack):
        """``{seed: accuracy in %}`` of ``attack`` over the seeds of ``group`` that have it."""
        return self._per_seed(group, lambda rid: self.value(rid, attack))

    def gap_by_seed(self, group, x, y):
        """``{seed: points}`` of attack ``x``'s accuracy minus attack ``y``'s, both from one report of each run:
        a gap between attacks read on two image sets would carry the sets' difference as well."""
        def gap(rid):
            both = self.in_one_report(rid, (x, y))
            return None if both is None else both[0] - both[1]

        return self._per_seed(group, gap)

    def _per_seed(self, group, fraction_of):
        values = {}
        for rid in self.groups.get(group, []):
            value = fraction_of(rid)
            if value is not None:
                values[int(rid.rsplit("_s", 1)[1])] = 100 * value
        return values

    def cell(self, group, attack):
        """``mean`` or ``mean ± std`` in %, or ``—``; ``[n of N seeds]`` after it while only n of the group's N
        planned seeds have the value (a partial mean is not read as the final one)."""
        values = list(self.by_seed(group, attack).values())
        return mean_std(values) + self.partial(group, len(values))

    def partial(self, group, n):
        """`` [n of N seeds]`` when 0 < n < the N seeds planned for ``group``, else ``""``."""
        planned = len(self.groups.get(group, []))
        return f" [{n} of {planned} seeds]" if 0 < n < planned else ""

    def mean(self, group, attack):
        """Mean accuracy in % of ``attack`` over the seeds of ``group`` that have it, or None."""
        values = list(self.by_seed(group, attack).values())
        return float(np.mean(values)) if values else None

    def triple(self, group):
        """``clean / PGD-50 / AA`` (AA left out where it was not run); a partial seed count once at the end when
        the three have the same, else after each value."""
        values = [list(self.by_seed(group, a).values()) for a in ("clean", "pgd50", "autoattack")]
        values = values if values[2] else values[:2]  # each report read once
        counts = {len(v) for v in values}
        if len(counts) == 1:
            return " / ".join(mean_std(v) for v in values) + self.partial(group, counts.pop())
        return " / ".join(mean_std(v) + self.partial(group, len(v)) for v in values)

    def n_examples(self, name="eval"):
        """How many test images the first run with a ``NAME.json`` was evaluated on, or None."""
        for rid in self.plan.runs:
            report = self.report(rid, name)
            if report and "n_examples" in report:
                return report["n_examples"]
        return None

    def epochs(self, group):
        """Total training epochs of a group's runs: their own phases plus those of the runs they start from."""
        rid = self.groups[group][0]
        total, spec = 0, self.plan.runs[rid]
        while True:
            total += spec.total_epochs
            if not spec.deps:
                return total
            spec = self.plan.runs[spec.deps[0]]

    def hydra_label(self, group):
        """"HYDRA" for HYDRA's own per-layer k, "HYDRA (global k)" for the global variant."""
        for rid in self.groups.get(group, []):
            report = self.report(rid, "metrics")
            if report:
                budget = report["config"].get("effective_budget", report["config"].get("budget"))
                return "HYDRA" if budget == "layer" else "HYDRA (global k)"
        return "HYDRA"


def mean_std(values, digits=1):
    """``mean`` of one value, ``mean ± std`` (sample std) of several, ``—`` of none."""
    values = np.asarray(values, dtype=float)
    if not len(values):
        return "—"
    return f"{values.mean():.{digits}f}" if len(values) == 1 else \
        f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def group_of(rid):
    """The group (run id without its seed) of ``rid``."""
    return re.sub(r"_s\d+$", "", rid)


def _header(results, title):
    p = results.plan.p
    n, n_aa = results.n_examples(), results.n_examples("eval_aa")
    seeds = len({rid.rsplit("_s", 1)[1] for rid in results.plan.runs})
    aa = (f"; AA = AutoAttack (in-graph APGD-CE → APGD-T → Square on the survivors) and, in the HYDRA table, B&B∞ "
          f"(foolbox's Brendel & Bethge L∞) on the first {n_aa} test images (the HYDRA table's runs get FGSM and PGD "
          "there too, so that claims.md's gradient-masking gaps compare attacks on one image set)" if n_aa else "")
    return [f"# {title}", "",
            f"{results.plan.dataset}, small_cnn, L∞ ε = {p['eps']}, training attack PGD-10; {seeds} seed(s) "
            f"(mean ± std; a cell that has only some of them so far says so: [n of {seeds} seeds]); accuracies in "
            f"% on the first {n if n else '?'} test images; robust = PGD-50 (step "
            f"2.5ε/50, random start){aa}. Made by `python -m training.reproduce` (manifest.json has every "
            "command); claims.md compares them seed by seed.", ""]


def bcs_table(results):
    """The BCS paper's layout: rows objectives, columns dense, then Random / Fixed / BCS at 90% and 99%; with
    compute-matched rows (every method trained as long as Fixed in all) beside the papers' protocol."""
    p = results.plan.p
    e, m = p["epochs"], 2 * p["epochs"]
    lines = _header(results, f"Robust sparse training: BCS vs. Random and Fixed ({e} epochs)")
    lines += ["cells: clean / PGD-50 / AA; epochs in all in brackets (Fixed: dense pre-training + fine-tuning)", "",
              "| objective | protocol | dense | Random 90% | Fixed 90% | BCS 90% | Random 99% | Fixed 99% | BCS 99% |",
              "|---|---|---|---|---|---|---|---|---|"]

    def cell(group):
        return f"{results.triple(group)} ({results.epochs(group)})" if group in results.groups else "—"

    for objective in p["bcs_objectives"]:
        rows = [("papers'", "", "")]
        if p.get("matched") and objective != "natural":
            rows.append((f"matched ({m} epochs)", f"_e{m}", f"_e{m}"))
        for label, tag, dense_tag in rows:
            cells = [cell(f"{objective}/dense{dense_tag}")]
            for c in ("0.1", "0.01"):
                cells += [cell(f"{objective}/random_c{c}{tag}"), cell(f"{objective}/fixed_c{c}"),
                          cell(f"{objective}/bcs_c{c}{tag}")]
            lines.append(f"| {OBJECTIVE_NAMES[objective]} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def hydra_table(results):
    """HYDRA vs BCS at 90% and 99% sparsity, one block of attack rows per objective."""
    p = results.plan.p
    lines = _header(results, "HYDRA vs. BCS")
    bcs = [("", p["epochs"])] + ([(f"_e{2 * p['epochs']}", 2 * p["epochs"])] if p.get("matched") else [])
    for objective in ("at", "trades"):
        for c, name in (("0.1", "90%"), ("0.01", "99%")):
            hydra = f"{objective}/hydra_c{c}"
            if hydra not in results.groups:
                continue
            label = f"{results.hydra_label(hydra)} {name} ({results.epochs(hydra)} ep.)"
            heads = [label] + [f"BCS {name} ({e} ep.)" for _, e in bcs]
            lines += [f"## {OBJECTIVE_NAMES[objective]}, {name} sparsity", "",
                      "| attack | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
            for row, attack in ATTACK_ROWS:
                cells = [results.cell(hydra, attack)] + [results.cell(f"{objective}/bcs_c{c}{t}", attack)
                                                         for t, _ in bcs]
                if any(x != "—" for x in cells):
                    lines.append(f"| {row} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def _sparsity_columns(p):
    """The sparsity table's methods as ``(label, method, matched)``: the papers' and, when the preset is matched,
    BCS trained as long as Fixed."""
    columns = [(SPARSITY_LABELS[m], m, False) for m in SPARSITY_METHODS]
    if p.get("matched"):
        columns.append((f"BCS, {2 * p['sparsity_epochs']} epochs (matched to Fixed)", "bcs", True))
    return columns


def sparsity_table(results):
    """Robust and clean accuracy against sparsity per method, and IWI against plain AT of the large network."""
    p = results.plan.p
    e = p["sparsity_epochs"]
    columns = _sparsity_columns(p)
    lines = _header(results, f"Sparsity and robustness (Wang et al.): Standard AT, {e} epochs per phase")
    lines += [f"Lottery tickets: {p['prune_rounds']} rounds of iterative global magnitude pruning, "
              f"{p['round_epochs']} epoch(s) per intermediate round; sparsity 0 is the dense network (its "
              "matched column: trained as long as Fixed in all).", "",
              "cells: clean / PGD-50 / AA (epochs in all)", "",
              "| sparsity | " + " | ".join(label for label, _, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for s in SPARSITIES:
        cells = []
        for _, method, matched in columns:
            group = sparsity_group(method, s, e, matched)
            cells.append(f"{results.triple(group)} ({results.epochs(group)})" if group in results.groups else "—")
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Inverse weights inheritance", "",
              "| network | epochs in all | clean | PGD-50 |", "|---|---|---|---|"]
    rows = [("small_cnn, BCS at 90% sparsity (the small network)", f"at/bcs_c0.1_e{e}"),
            ("small_cnn_x2, plain AT (dense)", f"at/dense_x2_e{e}"),
            ("small_cnn_x2, IWI from the small network (dense)", f"at/iwi_x2_e{e}")]
    if p.get("matched"):
        rows.append(("small_cnn_x2, plain AT as long as IWI in all", f"at/dense_x2_e{2 * e}"))
    for label, group in rows:
        if group in results.groups:
            lines.append(f"| {label} | {results.epochs(group)} | {results.cell(group, 'clean')} | "
                         f"{results.cell(group, 'pgd50')} |")
    natural = [(f"Fixed {pct}, AT from the AT dense run (adversarial pruning)", f"at/fixed_c{c}_e{e}")
               for c, pct in (("0.1", "90%"), ("0.01", "99%"))]
    natural += [(f"Fixed {pct}, AT from the naturally trained dense run (natural pruning)",
                 f"at/fixed_c{c}_natsrc_e{e}") for c, pct in (("0.1", "90%"), ("0.01", "99%"))]
    if any(group in results.groups for _, group in natural[2:]):
        lines += ["", "## Adversarial vs natural pruning", "", "| network | epochs in all | clean | PGD-50 | AA |",
                  "|---|---|---|---|---|"]
        for label, group in natural:
            lines.append(f"| {label} | {results.epochs(group)} | {results.cell(group, 'clean')} | "
                         f"{results.cell(group, 'pgd50')} | {results.cell(group, 'autoattack')} |")
    return "\n".join(lines) + "\n"


def sparsity_series(results, attack):
    """The sparsity figure's data for ``attack``: ``(dense lines, series)``. A dense line is ``(label, mean, seeds)``
    (the papers' dense run and, when matched, the one trained as long as Fixed); a series is ``(label, matched,
    connectivities, means, stds, seeds per point)`` per method (std over seeds, 0 for one seed, NaN where no run
    has finished), BCS trained as long as Fixed among them when the preset is matched."""
    p = results.plan.p
    e = p["sparsity_epochs"]
    conns = np.array([_conn_of(s) for s in SPARSITIES[1:]])
    lines, series = [], []
    for matched in (False, True) if p.get("matched") else (False,):
        dense = list(results.by_seed(sparsity_group("dense", 0, e, matched), attack).values())
        if dense:
            lines.append((f"dense ({2 * e if matched else e} epochs)", float(np.mean(dense)), len(dense)))
    for label, method, matched in _sparsity_columns(p):
        stats = [list(results.by_seed(sparsity_group(method, s, e, matched), attack).values())
                 for s in SPARSITIES[1:]]
        series.append((label, matched, conns, np.array([np.mean(v) if v else np.nan for v in stats]),
                       np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in stats]),
                       [len(v) for v in stats]))
    return lines, series


def sparsity_figure(results, path):
    """``sparsity.png``: PGD-50 and clean accuracy against connectivity (log scale), one line per method, with
    error bars (std over seeds), the y-range fitted to the data and the legend below the axes."""
    from training.report import pyplot, save_figure
    e = results.plan.p["sparsity_epochs"]
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 5.8))
    counts = set()  # seeds behind each point: while the job runs, points of fewer seeds have narrower (or no) bars
    for ax, attack, title in ((axes[0], "pgd50", "robust accuracy (PGD-50)"), (axes[1], "clean", "clean accuracy")):
        lines, series = sparsity_series(results, attack)
        for (label, mean, seeds), style in zip(lines, ("--", ":")):
            ax.axhline(mean, color="k", ls=style, lw=1, label=label)
            counts.add(seeds)
        for i, (label, matched, conns, mean, std, seeds) in enumerate(series):
            counts.update(n for n in seeds if n)
            # methods side by side around each connectivity (log-spaced), so their error bars do not hide each other
            dodge = 10 ** ((i - (len(series) - 1) / 2) * 0.02)
            ax.errorbar(conns * dodge, mean, yerr=std, marker="s" if matched else "o", ms=4, capsize=3,
                        ls="--" if matched else "-", label=label)
        conns = series[0][2]
        ax.set_xscale("log")
        ax.set_xticks(conns, [f"{c:g}" for c in conns])
        ax.minorticks_off()
        low, high = ax.get_ylim()  # at least 10 points tall, so seed noise does not look like a trend
        mid, half = (low + high) / 2, max((high - low) / 2, 5.0)
        ax.set_ylim(mid - half, mid + half)
        ax.invert_xaxis()  # sparser to the right
        ax.set_xlabel("connectivity (weights kept, log scale; methods side by side)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    seeds = f"{min(counts)}–{max(counts)} seeds a point" if len(counts) > 1 else f"{max(counts, default=0)} seed(s)"
    fig.suptitle(f"{results.plan.dataset}, {results.plan.preset} preset, small_cnn, standard AT, {e} epochs per "
                 f"phase, {seeds} (mean ± std), n = {results.n_examples()} test images; y-axes do not start "
                 "at 0", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))  # the legend gets the bottom strip, off the data
    save_figure(fig, path, layout=False)


def _conn_of(sparsity):
    return round(1 - sparsity, 6)


def connectivity_figure(results, path):
    """``connectivity.png``: active connections per layer over training of a BCS run (the first 99% AT run that
    logged them), named in the title; returns its id."""
    from training.report import Run, plot_connectivity, pyplot, save_figure

    for rid in sorted(results.plan.runs, key=lambda r: ("bcs_c0.01" not in r, "at/" not in r, r)):
        if results.plan.runs[rid].flags["method"] != "bcs" or not RunDir(results.runs_dir / rid).metrics.is_file():
            continue
        run = Run(results.runs_dir / rid)
        if not run.layers():
            continue
        fig, ax = pyplot().subplots(figsize=(8, 4.5))
        plot_connectivity(ax, run)
        ax.set_title(f"run {rid} ({results.plan.runs[rid].flags['epochs']} epochs): "
                     f"{run.metrics['connectivity']['active']:,} connections in all at every step", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the data
        fig.tight_layout()
        save_figure(fig, path)
        return rid
    return None


def write_tables(tables, the_plan, out):
    """Write the tables, the claims (training.claims) and the figures of ``tables`` into ``out`` from the runs
    collected in ``out/runs``; returns the paths written."""

    results = Results(the_plan, out / "runs")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        path = out / f"table_{table}.md"
        atomic_write(path, {"bcs": bcs_table, "hydra": hydra_table, "sparsity": sparsity_table}[table](results))
        written.append(path)
    if the_plan.seeds > 1 or the_plan.p.get("matched"):
        written.append(write_claims(results, tables, out / "claims.md"))
    if "sparsity" in tables:
        sparsity_figure(results, out / "sparsity.png")
        written.append(out / "sparsity.png")
    if connectivity_figure(results, out / "connectivity.png"):
        written.append(out / "connectivity.png")
    return written
