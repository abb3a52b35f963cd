"""Tables and figures of ``training.reproduce`` from the runs' ``metrics.json`` and ``eval.json``.

Cells are accuracies in % on the evaluated test images, ``mean ± std`` over seeds when there are several; a
run that has not finished (or not been evaluated) shows as ``—``.
"""

from __future__ import annotations

import json
import re

import numpy as np

ATTACK_ROWS = (("Clean", "clean"), ("FGSM", "fgsm"), ("PGD-50", "pgd50"), ("PGD-100", "pgd100"),
               ("B&B∞", "bb"), ("AA∞", "autoattack"))
OBJECTIVE_NAMES = {"natural": "Natural training", "at": "Standard AT (Madry)", "mat": "Mixed-batch AT",
                   "trades": "TRADES", "mart": "MART"}
SPARSITY_LABELS = {"fixed": "adversarial magnitude pruning (Fixed)", "lottery": "lottery ticket (rewind)",
                   "lottery_reinit": "lottery re-init (control)", "bcs": "BCS", "hydra": "HYDRA"}


class Results:
    """Accuracies of the planned runs, grouped over seeds."""

    def __init__(self, the_plan, runs_dir):
        self.plan, self.runs_dir = the_plan, runs_dir
        self.groups = {}
        for rid in the_plan.runs:
            self.groups.setdefault(re.sub(r"_s\d+$", "", rid), []).append(rid)

    def accuracies(self, group, attack):
        """Accuracies of ``attack`` over the seeds of ``group`` that have it."""
        values = []
        for rid in self.groups.get(group, []):
            try:
                report = json.loads((self.runs_dir / rid / "eval.json").read_text())
                values.append(report["attacks"][attack]["accuracy"])
            except (OSError, ValueError, KeyError):
                continue
        return values

    def cell(self, group, attack):
        """``mean`` or ``mean ± std`` in %, or ``—``."""
        values = 100 * np.asarray(self.accuracies(group, attack))
        if not len(values):
            return "—"
        return f"{values.mean():.1f}" if len(values) == 1 else f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"

    def mean(self, group, attack):
        values = self.accuracies(group, attack)
        return 100 * float(np.mean(values)) if values else None

    def pair(self, group, robust="pgd50"):
        """``clean / robust``."""
        return f"{self.cell(group, 'clean')} / {self.cell(group, robust)}"

    def n_examples(self):
        for rid in self.plan.runs:
            try:
                return json.loads((self.runs_dir / rid / "eval.json").read_text())["n_examples"]
            except (OSError, ValueError, KeyError):
                continue
        return None


def _header(results, title):
    p = results.plan.p
    n = results.n_examples()
    return [f"# {title}", "",
            f"{results.plan.dataset}, small_cnn, L∞ ε = {p['eps']}, training attack PGD-10; "
            f"{len(set(rid.rsplit('_s', 1)[1] for rid in results.plan.runs))} seed(s); accuracies in % on the first "
            f"{n if n else '?'} test images; robust = PGD-50 (step 2.5ε/50, random start). "
            "Made by `python -m training.reproduce` (manifest.json has every command).", ""]


def bcs_table(results):
    """The BCS paper's table layout: rows objectives, columns dense, then Random / Fixed / BCS at 90% and 99%."""
    p = results.plan.p
    lines = _header(results, f"Robust sparse training: BCS vs. Random and Fixed ({p['epochs']} epochs)")
    lines += ["cells: clean / PGD-50", "",
              "| objective | dense | Random 90% | Fixed 90% | BCS 90% | Random 99% | Fixed 99% | BCS 99% |",
              "|---|---|---|---|---|---|---|---|"]
    for objective in p["bcs_objectives"]:
        cells = [results.pair(f"{objective}/dense")]
        for c in ("0.1", "0.01"):
            cells += [results.pair(f"{objective}/{m}_c{c}") for m in ("random", "fixed", "bcs")]
        lines.append(f"| {OBJECTIVE_NAMES[objective]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def hydra_table(results):
    """HYDRA vs BCS at 90% and 99% sparsity, one block of attack rows per objective."""
    lines = _header(results, "HYDRA vs. BCS")
    for objective in ("at", "trades"):
        lines += [f"## {OBJECTIVE_NAMES[objective]}", "",
                  "| attack | HYDRA 90% | BCS 90% | Δ | HYDRA 99% | BCS 99% | Δ |", "|---|---|---|---|---|---|---|"]
        for label, attack in ATTACK_ROWS:
            cells = []
            for c in ("0.1", "0.01"):
                h, b = (f"{objective}/{m}_c{c}" for m in ("hydra", "bcs"))
                mh, mb = results.mean(h, attack), results.mean(b, attack)
                cells += [results.cell(h, attack), results.cell(b, attack),
                          f"{mb - mh:+.1f}" if mh is not None and mb is not None else "—"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _sparsity_group(method, sparsity, epochs):
    if sparsity == 0:
        return f"at/dense_e{epochs}"
    c = f"{round(1 - sparsity, 6):g}"
    if method == "lottery_reinit":
        return f"at/lottery_c{c}_reinit_e{epochs}"
    return f"at/{method}_c{c}_e{epochs}"


def sparsity_table(results):
    """Robust and clean accuracy against sparsity per method, and IWI against plain AT of the large network."""
    from training.reproduce import SPARSITIES, SPARSITY_METHODS

    p = results.plan.p
    e = p["sparsity_epochs"]
    lines = _header(results, f"Sparsity and robustness (Wang et al.): Standard AT, {e} epochs per run")
    lines += [f"Lottery tickets: {p['prune_rounds']} rounds of iterative global magnitude pruning, "
              f"{p['round_epochs']} epoch(s) per intermediate round; sparsity 0 is the dense network.", "",
              "cells: clean / PGD-50", "",
              "| sparsity | " + " | ".join(SPARSITY_LABELS[m] for m in SPARSITY_METHODS) + " |",
              "|---|" + "---|" * len(SPARSITY_METHODS)]
    for s in SPARSITIES:
        lines.append(f"| {s:g} | " + " | ".join(results.pair(_sparsity_group(m, s, e)) for m in SPARSITY_METHODS)
                     + " |")
    lines += ["", "## Inverse weights inheritance", "",
              "| network | clean | PGD-50 |", "|---|---|---|"]
    for label, group in ((f"small_cnn, BCS at 90% sparsity (the small network)", f"at/bcs_c0.1_e{e}"),
                         ("small_cnn_x2, plain AT (dense)", f"at/dense_x2_e{e}"),
                         ("small_cnn_x2, IWI from the small network (dense)", f"at/iwi_x2_e{e}")):
        lines.append(f"| {label} | {results.cell(group, 'clean')} | {results.cell(group, 'pgd50')} |")
    return "\n".join(lines) + "\n"


def sparsity_figure(results, path):
    """``sparsity.png``: PGD-50 and clean accuracy against sparsity, one line per method."""
    from training.report import pyplot, save_figure
    from training.reproduce import SPARSITIES, SPARSITY_METHODS

    e = results.plan.p["sparsity_epochs"]
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4), sharex=True)
    xs = np.arange(len(SPARSITIES))
    for ax, attack, title in ((axes[0], "pgd50", "robust (PGD-50)"), (axes[1], "clean", "clean")):
        for method in SPARSITY_METHODS:
            ys = [results.mean(_sparsity_group(method, s, e), attack) for s in SPARSITIES]
            ys = [np.nan if y is None else y for y in ys]
            ax.plot(xs, ys, marker="o", label=SPARSITY_LABELS[method])
        ax.set_xticks(xs, [f"{s:g}" for s in SPARSITIES])
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results.plan.dataset}, small_cnn, standard AT")
    save_figure(fig, path)


def connectivity_figure(results, path):
    """``connectivity.png``: active connections per layer over training of the first BCS run that logged them."""
    from training.report import Run, plot_connectivity, pyplot, save_figure

    for rid in sorted(results.plan.runs, key=lambda r: ("bcs_c0.01" not in r, "at/" not in r, r)):
        if results.plan.runs[rid].flags["method"] != "bcs" or not (results.runs_dir / rid / "metrics.json").is_file():
            continue
        run = Run(results.runs_dir / rid)
        if not run.layers():
            continue
        fig, ax = pyplot().subplots(figsize=(7, 4))
        plot_connectivity(ax, run)
        ax.set_title(f"BCS {rid}: {run.metrics['connectivity']['active']:,} connections in total at every step")
        save_figure(fig, path)
        return rid
    return None


def write_tables(tables, the_plan, out):
    """Write the tables (and figures) of ``tables`` into ``out`` from the runs collected in ``out/runs``;
    returns the paths written."""
    results = Results(the_plan, out / "runs")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        path = out / f"table_{table}.md"
        path.write_text({"bcs": bcs_table, "hydra": hydra_table, "sparsity": sparsity_table}[table](results))
        written.append(path)
    if "sparsity" in tables:
        sparsity_figure(results, out / "sparsity.png")
        written.append(out / "sparsity.png")
    if connectivity_figure(results, out / "connectivity.png"):
        written.append(out / "connectivity.png")
    return written
