"""``python -m training.report RUN_DIR [RUN_DIR ...]``: a run's numbers as pictures a user can open.

Beside each run it writes ``report.md`` and, under ``figures/``: ``curves.png`` (train and validation clean /
robust accuracy per epoch, the selected epoch marked), ``connectivity.png`` (active connections per layer over
training, for sparse runs) and ``attacks.png`` (the attack table of ``eval.json`` as bars, when the run was
evaluated). With several runs, ``--overlay FILE.png`` (default: ``report_overlay.png`` in the runs' common
directory) draws their validation curves and attack results in one figure. Reads only ``metrics.json`` and
``eval.json``: no TensorFlow.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import sys

from bcs_run import cli
from bcs_run.rundir import RunDir, atomic_write
from bcs_run.attacks import ATTACK_LABELS

CURVES = (("clean_acc", "train clean", "C0", ":"), ("robust_acc", "train robust", "C3", ":"),
          ("val_clean_acc", "validation clean", "C0", "-"), ("val_robust_acc", "validation robust", "C3", "-"))



def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Run:
    """What the report needs from one run directory: its metrics, config and evaluations (``*.json``)."""

    def __init__(self, run_dir):
        self.dir = pathlib.Path(run_dir)
        path = RunDir(self.dir).metrics
        try:
            self.metrics = json.loads(path.read_text())
        except OSError:
            raise cli.FlagError(f"{self.dir} has no metrics.json (is it a finished `training.run` output?)") from None
        except ValueError as exc:
            raise cli.FlagError(f"{path} is not readable JSON ({exc})") from None
        self.history = self.metrics.get("history") or []
        self.config = self.metrics.get("config", {})
        self.evals = {}
        for report in sorted(self.dir.glob("eval*.json")):
            try:
                self.evals[report.stem] = json.loads(report.read_text())
            except ValueError:
                continue

    @property
    def label(self):
        """Short name for legends: method, connectivity and objective."""
        c = self.config
        conn = "" if c.get("connectivity", 1) >= 1 else f" c={c['connectivity']:g}"
        return f"{self.dir.name} ({c.get('method', '?')}{conn}, {c.get('objective', '?')})"

    def layers(self):
        """Layers whose active connections the history logged per epoch."""
        return [k[len("active/"):] for k in (self.history[0] if self.history else {}) if k.startswith("active/")]

    def attacks(self):
        """``{attack: (accuracy, n)}`` over all evaluation reports (the one on more examples wins)."""
        found = {}
        for report in self.evals.values():
            for name, r in report.get("attacks", {}).items():
                if name not in found or r["n"] > found[name][1]:
                    found[name] = (r["accuracy"], r["n"])
        return {name: found[name] for name in sorted(found, key=_attack_order)}


def _attack_order(name):
    names = list(ATTACK_LABELS)
    return (names.index(name) if name in names else len(names), name)


def plot_curves(ax, run, keys=CURVES):
    """Accuracy per epoch of ``run`` on ``ax``, the selected (saved) epoch starred on every curve."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in run.history]
    best = run.metrics.get("best_epoch")
    for key, label, color, style in keys:
        ys = [100 * h[key] if h.get(key) is not None else float("nan") for h in run.history]
        if all(y != y for y in ys):
            continue
        ax.plot(epochs, ys, style, color=color, marker="o", markersize=3, label=label)
        if best in epochs:
            ax.plot([best], [ys[epochs.index(best)]], "*", color=color, markersize=11)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (★ = selected)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)


def plot_connectivity(ax, run):
    """Active connections per layer over training (epoch 0 = the initial allocation, when recorded)."""
    counts = (run.metrics.get("allocation") or {}).get("counts")
    from matplotlib.ticker import MaxNLocator

    for i, layer in enumerate(run.layers()):
        epochs = [h["epoch"] for h in run.history]
        ys = [h[f"active/{layer}"] for h in run.history]
        if counts and len(counts) == len(run.layers()):
            epochs, ys = [0] + epochs, [counts[i]] + ys
        ax.plot(epochs, ys, marker="o", markersize=3, label=layer)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("active connections")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_attacks(ax, runs):
    """Accuracy under each attack as grouped bars, one colour per run."""
    names = sorted({a for run in runs for a in run.attacks()}, key=_attack_order)
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        found = run.attacks()
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(names))]
        ys = [100 * found[a][0] if a in found else 0.0 for a in names]
        bars = ax.bar(xs, ys, width, label=run.label if len(runs) > 1 else None)
        if len(runs) == 1:
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), [ATTACK_LABELS.get(a, a) for a in names], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y")


def save_figure(fig, path, layout=True):
    """Write ``fig`` to ``path`` (parents created) and close it; returns ``path``. ``layout=False`` keeps a layout
    the caller made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
    atomic_write(path, buffer.getvalue())  # a full disk leaves the previous figure, not half of a new one
    return path


def run_report(run):
    """Write ``report.md`` and the figures of one run; returns the paths written."""
    plt = pyplot()
    figures, written = run.dir / "figures", []
    if run.history:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        plot_curves(ax, run)
        ax.set_title(run.label, fontsize=9)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, figures / "curves.png"))
    if run.layers():
        fig, ax = plt.subplots(figsize=(6.5, 4))
        plot_connectivity(ax, run)
        total = run.metrics.get("connectivity", {}).get("active")
        ax.set_title(f"{run.label}: {total:,} connections at every step" if total else run.label, fontsize=9)
        written.append(save_figure(fig, figures / "connectivity.png"))
    if run.attacks():
        fig, ax = plt.subplots(figsize=(6.5, 4))
        plot_attacks(ax, [run])
        ax.set_title(f"{run.label}, eps={run.config.get('eps')}", fontsize=9)
        written.append(save_figure(fig, figures / "attacks.png"))
    atomic_write(run.dir / RunDir.REPORT, markdown(run, written))
    return [run.dir / RunDir.REPORT, *written]


def markdown(run, figures):
    """``report.md``: the run's headline numbers, per-epoch table, attacks and links to the figures."""
    m, c = run.metrics, run.config
    lines = [f"# {run.label}", ""]
    conn = m.get("connectivity", {})
    pgd = next((k for k in m if k.startswith("test_pgd")), None)
    lines += [f"- test clean accuracy **{100 * m['test_clean_acc']:.2f}%**" if "test_clean_acc" in m else "",
              f"- test PGD-{pgd[len('test_pgd'):-len('_acc')]} accuracy **{100 * m[pgd]:.2f}%** (eps {c.get('eps')})"
              if pgd else "",
              f"- connectivity {conn.get('connectivity', 1.0):.4f}"
              + (f" ({conn['active']:,} of {conn['size']:,} kernel entries)" if "active" in conn else ""),
              f"- selected epoch {m.get('best_epoch')} by {m.get('selected_by')}; {m.get('steps')} steps, "
              f"{m.get('train_seconds', 0) / 60:.1f} min training",
              f"- model {c.get('model')}, dataset {c.get('dataset')}, seed {c.get('seed')}", ""]
    lines = [line for line in lines if line != ""] + [""]
    keys = [k for k, *_ in CURVES if any(k in h for h in run.history)]
    if keys:
        lines += ["| epoch | loss | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                  "|---" * (len(keys) + 2) + "|"]
        for h in run.history:
            cells = [f"{100 * h[k]:.2f}" if k in h else "—" for k in keys]
            mark = " ←" if h["epoch"] == m.get("best_epoch") else ""
            lines.append(f"| {h['epoch']}{mark} | {h.get('loss', float('nan')):.4f} | " + " | ".join(cells) + " |")
        lines.append("")
    if run.attacks():
        lines += ["| attack | accuracy | examples |", "|---|---|---|"]
        lines += [f"| {ATTACK_LABELS.get(a, a)} | {100 * acc:.2f}% | {n} |" for a, (acc, n) in run.attacks().items()]
        lines.append("")
    lines += [f"![{p.stem}](figures/{p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def overlay(runs, path):
    """One figure comparing several runs: validation robust and clean accuracy per epoch, and the attacks."""
    plt = pyplot()
    with_attacks = any(run.attacks() for run in runs)
    fig, axes = plt.subplots(1, 3 if with_attacks else 2, figsize=(16 if with_attacks else 11, 4.5))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for ax, key, title in ((axes[0], "val_robust_acc", "validation robust"),
                               (axes[1], "val_clean_acc", "validation clean")):
            plot_curves(ax, run, keys=((key, run.label, color, "-"),))
            ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    if with_attacks:
        plot_attacks(axes[2], runs)
        axes[2].set_title("test attacks", fontsize=9)
    return save_figure(fig, pathlib.Path(path))


def write_reports(run_dirs, overlay_path=None):
    """Reports for every run in ``run_dirs`` (and the overlay figure when there are several); returns paths."""
    runs = [Run(d) for d in run_dirs]
    written = [p for run in runs for p in run_report(run)]
    if len(runs) > 1:
        if overlay_path is None:
            common = pathlib.Path(os.path.commonpath([str(r.dir.resolve()) for r in runs]))
            overlay_path = common / "report_overlay.png"
        written.append(overlay(runs, overlay_path))
    return written


def build_parser():
    """The ``training.report`` parser."""
    p = cli.parser("python -m training.report", __doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by `python -m training.run`")
    p.add_argument("--overlay", help="where the comparison figure of several runs goes "
                   "(default: report_overlay.png in their common directory)")
    return p


@cli.one_line_errors
def main(argv=None):
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    for path in write_reports(args.run_dirs, args.overlay):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
