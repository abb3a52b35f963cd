"""``bench.micro``'s table (``table.md``) and plot (``micro.png``) from the collected runs and their TFLM
export reports: every flash and arena number is read from the exported file and the interpreter, every accuracy
from the run's evaluation; the differences between families are paired over seeds (training.claims)."""

from __future__ import annotations

import numpy as np

from bcs_run.rundir import atomic_write

PAIRS = (("bcs", "dense", "BCS channels − dense, narrower"), ("random", "dense", "Random channels − dense, narrower"),
         ("bcs", "random", "BCS channels − Random channels"))


def _group(method, width, steps):
    return f"{method}_w{width}of{steps}"


def _stat(values, scale=100.0, digits=1):
    from training.tables import mean_std

    return mean_std([scale * v for v in values if v is not None], digits)


def _tflm(reports, rids, path):
    """The values at ``path`` (keys into the export report) of the runs ``rids`` that have a report."""
    values = []
    for rid in rids:
        entry = reports.get(rid)
        for key in path:
            entry = entry.get(key) if isinstance(entry, dict) else None
        values.append(entry)
    return values


def write_report(the_plan, out, budgets, fits, sizes, block, key, arena_budget, reports):
    """Write ``table.md`` and ``micro.png`` into ``out``; returns their paths."""
    from bench.micro import FAMILIES, WIDTH_STEPS, _kb
    from training.claims import paired, verdict  # the one home of the paired statistics
    from training.tables import Results

    results = Results(the_plan, out / "runs")
    spec = next(iter(the_plan.runs.values())).flags
    lines = [f"# Robust networks within a microcontroller's flash (small_cnn on {spec['dataset']}, "
             f"{spec['objective']}, {spec['epochs']} epochs, ε = {spec['eps']})", "",
             "Every flash and arena figure is measured: the full-int8 TFLM flatbuffer's bytes, and the smallest tensor "
             f"arena that runs it on tflite-micro's x86 interpreter plus 10%. Fits: flash ≤ the budget and arena ≤ "
             f"{_kb(arena_budget)}. Keras accuracies: clean and PGD-50 on the test images of eval.json, AutoAttack on "
             "those of eval_aa.json; TFLM: the int8 file on the interpreter (top-1 agreement with Keras, clean, and "
             "PGD-20 crafted on the Keras model, quantized to int8, as a transfer attack). Mean ± std over seeds.", "",
             "| flash budget | network | width | seeds | flash bytes | arena bytes | fits | clean | PGD-50 | AA | "
             "TFLM agreement | TFLM clean | TFLM PGD-20 transfer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    points = {method: [] for method, _ in FAMILIES}
    for budget in budgets:
        width = fits[budget]
        if width is None:
            lines.append(f"| {_kb(budget)} | nothing fits: small_cnn at width 1/{WIDTH_STEPS} takes "
                         f"{sizes[1]:,} bytes | | | | | | | | | | | |")
            continue
        for method, label in FAMILIES:
            group = _group(method, width, WIDTH_STEPS)
            rids = [rid for rid in results.groups.get(group, []) if rid in reports and reports[rid]]
            flash = _tflm(reports, rids, ("micro", "flash_bytes"))
            arena = _tflm(reports, rids, ("micro", "arena", "recommended_bytes"))
            fit = "—" if not rids else "yes" if max(flash) <= budget and max(arena) <= arena_budget else "no"
            lines.append(
                f"| {_kb(budget)} | {label} | {width}/{WIDTH_STEPS} | {len(results.by_seed(group, 'clean'))} | "
                f"{_stat(flash, 1, 0)} | {_stat(arena, 1, 0)} | {fit} | {results.cell(group, 'clean')} | "
                f"{results.cell(group, 'pgd50')} | {results.cell(group, 'autoattack')} | "
                f"{_stat(_tflm(reports, rids, ('parity', 'top1_agreement')))} | "
                f"{_stat(_tflm(reports, rids, ('robustness', 'exported', 'clean')))} | "
                f"{_stat(_tflm(reports, rids, ('robustness', 'exported', 'pgd20_transfer')))} |")
            if rids:
                points[method].append((float(np.mean(flash)), results.by_seed(group, "pgd50"),
                                       results.by_seed(group, "autoattack")))
    lines += ["", f"Block granularity (1×4 blocks of the dense layers) at any connectivity: {block:,} bytes, measured "
              "the same way — TFLM has no sparse tensors, so a block-sparse network's file is the dense network's "
              f"and fits {'none of these budgets' if block > max(budgets) else 'only budgets ≥ ' + _kb(block)}; "
              "it is not trained here.", ""]
    key_width = fits[key]
    lines += [f"## Paired differences at {_kb(key)} (width {key_width}/{WIDTH_STEPS}; same seed = same data order)",
              "", "Percentage points, mean over seeds with a Student-t 95% interval; the verdict is on \"A > B\": "
              "held when the interval is above 0, contradicted when below, else not shown.", "",
              "| comparison | attack | seeds | A − B | 95% interval | verdict |", "|---|---|---|---|---|---|"]
    for a, b, label in PAIRS:
        for attack, name in (("clean", "clean"), ("pgd50", "PGD-50"), ("autoattack", "AA")):
            measured = paired(results, _group(a, key_width, WIDTH_STEPS), _group(b, key_width, WIDTH_STEPS), attack)
            if measured is None:
                lines.append(f"| {label} | {name} | 0 | — | — | not run |")
                continue
            n, mean, low, high = measured
            interval = "—" if low is None else f"[{low:+.1f}, {high:+.1f}]"
            lines.append(f"| {label} | {name} | {n} | {mean:+.1f} | {interval} | {verdict(measured)} |")
    table = out / "table.md"
    atomic_write(table, "\n".join(lines) + "\n")
    figure = out / "micro.png"
    _plot(points, figure, budgets, block, the_plan)
    return [table, figure]


def _plot(points, path, budgets, block, the_plan):
    from bench.micro import FAMILIES, _kb
    from training.report import pyplot, save_figure

    spec = next(iter(the_plan.runs.values())).flags
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4.6), sharex=True)
    for ax, (index, name) in zip(axes, ((1, "PGD-50"), (2, "AutoAttack"))):
        for (method, label), marker in zip(FAMILIES, "osd"):
            rows = [(p[0], list(p[index].values())) for p in points[method] if p[index]]
            if not rows:
                continue
            xs = [x / 1024 for x, _ in rows]
            means = [np.mean(v) for _, v in rows]
            errs = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in rows]
            ax.errorbar(xs, means, yerr=errs, marker=marker, capsize=3, label=label)
        for budget in budgets:
            ax.axvline(budget / 1024, color="0.85", lw=0.8, zorder=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks([b / 1024 for b in budgets], [_kb(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("flash: int8 TFLM flatbuffer (KB, log scale)")
        ax.set_ylabel(f"{name} accuracy (%)")
        ax.set_title(name)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)  # off the data
    fig.suptitle(f"small_cnn on {spec['dataset']}: {spec['objective']}, {spec['epochs']} epochs, ε = {spec['eps']}, "
                 f"mean ± std over seeds; block granularity needs {_kb(block)} at any connectivity", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path, layout=False)
