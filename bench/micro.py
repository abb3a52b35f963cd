"""Which robust networks fit a microcontroller (not a test): for each flash budget, the widest small_cnn whose
full-int8 TFLite Micro flatbuffer fits, trained three ways at that same width, each exported with
``python -m export --format micro`` and measured on the TFLM interpreter:

- **dense, narrower**: small_cnn with every layer's channels scaled to the width (``--width W``), trained dense;
- **BCS channels**: full-width small_cnn with channel gates keeping round(W·n) channels per layer
  (``--granularity channel``; per-layer budgets, so its compacted network has the narrow network's shape);
- **Random channels**: the same gates, fixed (``--method random``).

Block granularity is measured, not trained: TFLM stores every weight dense, so its flatbuffer is the full
network's whatever the connectivity (the report says how large). The runs go through ``training.reproduce``'s
scheduler (resume, manifest, archived networks in ``--out``); a table (``table.md``) and a plot (``micro.png``:
robust accuracy against flash bytes) are written, with BCS − dense and Random − dense as paired differences over
the seeds at the key budget.

    python -m bench.micro --flash 32k,64k,128k [--arena 32k] [--key 64k] [--seeds 3] [--epochs 5]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys

from bcs_run import cli
from bcs_run.config import DATASET_NAMES
from bcs_run.rundir import RunDir, atomic_write

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAMILIES = (("dense", "dense, narrower"), ("bcs", "BCS channels"), ("random", "Random channels"))
WIDTH_STEPS = 32  # widths are multiples of 1/32: small_cnn's 16-channel first layer keeps whole channels at 1/16
ATTACKS = ("clean", "pgd50")


def parse_bytes(text):
    """``"64k"`` → 65536, ``"1m"`` → 1048576, ``"4096"`` → 4096."""
    text = str(text).strip().lower()
    scale = {"k": 1024, "m": 1024 ** 2}.get(text[-1:], 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise cli.FlagError(f"expected a size such as 64k or 65536. Received: {text!r}") from None
    if value <= 0:
        raise cli.FlagError(f"a size must be > 0. Received: {text!r}")
    return int(value)


def _kb(n):
    return f"{n / 1024:.4g} KB"


def flash_bytes(width=1.0, granularity="weight", connectivity=1.0, input_shape=(28, 28, 1), num_classes=10):
    """Bytes of the full-int8 TFLM flatbuffer of small_cnn: ``width`` dense, or at ``granularity`` and
    ``connectivity`` (stripped or compacted, as the export does), its weights drawn at random first: the
    converter stores equal constant tensors once, so a fresh network (BatchNorm all ones and zeros) gives a
    smaller file than the trained one, while random weights give the trained network's size."""
    import numpy as np

    from bcs_tf.models import build_model
    from export import micro
    from export.strip import strip_model

    method = "dense" if connectivity >= 1 else "bcs"
    budget = "layer" if granularity == "channel" else "global"
    net, _ = build_model("small_cnn", method, connectivity, budget, input_shape=input_shape, num_classes=num_classes,
                         granularity=granularity, width=width)
    plain = strip_model(net) if method != "dense" else net
    rng = np.random.default_rng(0)
    for variable in plain.weights:  # positive, so BatchNorm variances stay valid
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype(variable.dtype))
    calib = rng.uniform(0, 1, (8, *input_shape)).astype(np.float32)
    with cli.native_output(0):  # the converter's own log
        return len(micro.convert(plain, calib))


def widest_fitting(budget, sizes):
    """The largest width k/32 whose flatbuffer fits ``budget`` bytes (bisection; ``sizes`` caches width → bytes),
    or None when even 1/32 does not."""
    def size(k):
        if k not in sizes:
            sizes[k] = flash_bytes(k / WIDTH_STEPS)
        return sizes[k]

    if size(1) > budget:
        return None
    low, high = 1, WIDTH_STEPS + 1  # size(low) fits; high does not (or is past the full width)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if size(mid) <= budget else (low, mid)
    return low


@dataclasses.dataclass
class MicroPlan:
    """The runs of the benchmark in the form :func:`training.jobs.execute` takes (``runs``, ``p``)."""

    runs: dict
    p: dict


def make_plan(widths, key_width, args):
    """One run per family, width and seed (``--seeds`` at the key budget's width, ``--other-seeds`` elsewhere)."""
    from training.plan import RunSpec

    runs = {}
    for width in sorted(set(widths), reverse=True):
        w = width / WIDTH_STEPS
        for seed in range(args.seeds if width == key_width else args.other_seeds):
            for method, _ in FAMILIES:
                flags = {"objective": args.objective, "method": method, "connectivity": 1.0 if method == "dense" else w,
                         "dataset": args.dataset, "epochs": args.epochs, "val_split": args.val_split, "eps": args.eps,
                         "seed": seed}
                if method == "dense":
                    flags["width"] = w
                else:
                    flags["granularity"] = "channel"
                if args.max_steps:
                    flags["max_steps"] = args.max_steps
                rid = f"{method}_w{width}of{WIDTH_STEPS}_s{seed}"
                runs[rid] = RunSpec(rid, flags, attacks=ATTACKS, aa=args.aa_examples > 0)
    return MicroPlan(runs, {"eval_examples": args.eval_examples, "aa_examples": args.aa_examples})


def export_micro(rid, runs_dir, out, n_examples, threads=None):
    """``python -m export RUN --format micro`` of a finished run (its output appended to the run's log), its report
    copied to ``out/runs/ID/micro.json``; skipped when that report is there already (a disagreement with Keras is
    measured, not refused). Returns the report's entry, or None when neither the run nor its archive is here."""
    from training.jobs import call

    dest = out / "runs" / rid / "micro.json"
    if dest.is_file():
        return json.loads(dest.read_text())
    run = runs_dir / rid
    # the run directory, or (collected on another machine) its archived network in --out
    source = run if RunDir(run).is_complete() else dest.parent if RunDir(dest.parent).archive.is_file() else None
    if source is None:
        return None
    target = run / "export" / "micro" / "model_int8.tflite"
    log = runs_dir / f"{rid}.log"
    cmd = [sys.executable, "-m", "export", str(source), "--format", "micro", "--n-examples", str(n_examples),
           "--max-zeroed", "1", "--allow-mismatch", "--overwrite", "--out", str(target), "--verbose", "0"]
    if call(cmd, log, threads=threads).returncode != 0:
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        raise cli.FlagError(f"the micro export of {rid} failed: {' '.join(last)[-300:]} (log: {log})")
    entry = json.loads((target.parent / "export_report.json").read_text())[target.name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, json.dumps(entry, indent=1))
    shutil.copyfile(target, dest.with_suffix(".tflite"))  # the file the numbers were measured on
    return entry


def build_parser():
    """The ``bench.micro`` parser."""
    p = cli.parser("python -m bench.micro", __doc__)
    p.add_argument("--flash", default="32k,64k,128k", help="comma-separated flash budgets (bytes; k = 1024)")
    p.add_argument("--arena", default="32k", help="RAM budget for the tensor arena (the recommended arena must fit)")
    p.add_argument("--key", default=None, help="the budget whose seeds give the paired differences (default: the "
                   "middle one)")
    p.add_argument("--seeds", type=cli.positive(int), default=3, help="seeds at the key budget")
    p.add_argument("--other-seeds", type=cli.positive(int), default=1, help="seeds at the other budgets")
    p.add_argument("--objective", default="at", help="training objective of every run")
    p.add_argument("--dataset", default="fashion_mnist", choices=DATASET_NAMES, help="dataset of every run")
    p.add_argument("--epochs", type=cli.positive(int), default=5, help="training epochs of every run")
    p.add_argument("--max-steps", type=cli.positive(int), default=None, help="cap on optimizer steps (tests)")
    p.add_argument("--val-split", type=int, default=1000, help="validation images (robust epoch selection)")
    p.add_argument("--eps", type=float, default=0.1, help="L∞ radius of training and evaluation attacks")
    p.add_argument("--eval-examples", type=cli.positive(int), default=10000, help="test images for clean / PGD-50")
    p.add_argument("--aa-examples", type=int, default=1000, help="test images for AutoAttack (0: none)")
    p.add_argument("--export-examples", type=cli.positive(int), default=1000,
                   help="test images for the TFLM agreement, clean and PGD-20 transfer accuracy")
    p.add_argument("--out", default="results/micro", help="results directory (table.md, micro.png, runs/)")
    p.add_argument("--runs-dir", default="runs/micro", help="run directories")
    p.add_argument("--threads", type=cli.positive(int), default=None,
                   help="TensorFlow threads of each process (default: all cores)")
    p.add_argument("--dry-run", action="store_true", help="measure the widths that fit and print the plan only")
    cli.add_verbose(p)
    return p


@cli.one_line_errors
def main(argv=None):
    """Fit widths to the budgets, train and evaluate, export to TFLM, write the table and the plot."""
    args = build_parser().parse_args(argv)
    budgets = sorted(parse_bytes(b) for b in args.flash.split(",") if b.strip())
    arena_budget = parse_bytes(args.arena)
    key = parse_bytes(args.key) if args.key else budgets[len(budgets) // 2]
    if key not in budgets:
        raise cli.FlagError(f"--key: {args.key} is not one of the --flash budgets")
    out, runs_dir = pathlib.Path(args.out), pathlib.Path(args.runs_dir).resolve()
    from training.jobs import Manifest, execute

    # seeds only name runs (their ids carry the seed), so more seeds later add runs to the same results directory
    settings = {k: v for k, v in vars(args).items()
                if k not in ("out", "runs_dir", "dry_run", "verbose", "threads", "seeds", "other_seeds")}
    manifest = Manifest(out / "manifest.json", settings)
    sizes = {int(k): v for k, v in manifest.data.get("flash_by_width", {}).items()}
    fits = {budget: widest_fitting(budget, sizes) for budget in budgets}
    block = manifest.data.get("block_flash_bytes") or flash_bytes(granularity="block", connectivity=0.01)
    manifest.data.update(flash_by_width={str(k): v for k, v in sorted(sizes.items())}, block_flash_bytes=block,
                         fits={str(b): w for b, w in fits.items()})
    for budget, width in fits.items():
        print(f"{_kb(budget)}: " + (f"width {width}/{WIDTH_STEPS} ({sizes[width]:,} bytes)" if width else
                                    f"nothing fits (width 1/{WIDTH_STEPS} takes {sizes[1]:,} bytes)"))
    print(f"block granularity (any connectivity): {block:,} bytes — TFLM stores every weight")
    if fits[key] is None:
        raise cli.FlagError(f"--key: no width fits {_kb(key)}")
    the_plan = make_plan([w for w in fits.values() if w], fits[key], args)
    print(f"{len(the_plan.runs)} runs in {runs_dir}")
    if args.dry_run:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    manifest.save()
    from bench.micro_report import write_report

    def report(strict=False):
        """Export every collected run not exported yet and rewrite the table and plot. Called after each run too, so
        a partial benchmark (killed, or still going) leaves readable results; there (not ``strict``) a failed
        export is printed and left out, and training goes on."""
        reports = {}
        for rid in the_plan.runs:
            if manifest.data["runs"].get(rid, {}).get("status") == "finished":
                try:
                    reports[rid] = export_micro(rid, runs_dir, out, args.export_examples, args.threads)
                except cli.FlagError as error:
                    if strict:
                        raise
                    print(f"    {error}", flush=True)
        return write_report(the_plan, out, budgets, fits, sizes, block, key, arena_budget, reports)

    with cli.exclusive(out, "--out"):
        failed, stopped = execute(the_plan, runs_dir, out, manifest, collected=report, threads=args.threads)
        if stopped:
            return 130
        written = report(strict=True)
    print(f"wrote {', '.join(str(p) for p in written)}" + (f"; {len(failed)} run(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
