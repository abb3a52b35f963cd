"""AutoAttack's cost and result: bcs_tf's in-graph attacks against ART's (not a test).

For each run, on the same first ``--n-examples`` test images, the standard AutoAttack sequence twice: APGD-CE
→ APGD-T (top-9 targets) → Square (``--square-queries``), each on the survivors of the one before — once with
ART's three attacks, once with bcs_tf's in-graph ones (APGD-T's targets batched, Square batched). Prints per
run the seconds per 1000 examples of every part and of the two sequences, their robust accuracies and the
difference, all measured in one run. Targets: the in-graph sequence ≤ 300 s per 1000 examples for small_cnn,
robust accuracy within 0.5 points of ART's.

    python -m bench.eval_time RUN_DIR [RUN_DIR ...] [--n-examples 1000] [--square-queries 5000]
"""

from __future__ import annotations

import sys

from bcs_run import cli


def build_parser():
    """The benchmark's parser."""
    p = cli.parser("python -m bench.eval_time", __doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished `training.run` directories")
    p.add_argument("--n-examples", type=cli.positive(int), default=1000, metavar="N", help="first N test images")
    p.add_argument("--square-queries", type=cli.positive(int), default=5000, metavar="N",
                   help="query budget of both Square attacks")
    p.add_argument("--batch-size", type=cli.positive(int), default=256, metavar="N", help="examples per batch")
    return p


def measure(run_dir, n_examples, square_queries, batch_size):
    """``{version: {part: (robust fraction after it, seconds)}}`` for one run, version "art" or "tf"."""
    import numpy as np

    from bcs_tf.data import load_dataset
    from bcs_run.config import load_finished_run

    from bcs_tf.robustness import Evaluator

    with cli.native_output(0):  # ART's import warns that PyTorch is absent
        import bcs_tf.robustness.art  # noqa: F401  (once, up front: it closes the logging streams that exist)

    cfg, net = load_finished_run(run_dir)
    data = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
    x, y = data.x_test[:n_examples], data.y_test[:n_examples]
    results = {}
    for version in ("art", "tf"):
        ev = Evaluator(net, cfg.eps, data.num_classes, batch_size, seed=cfg.seed, verbose=0,
                       square_queries=square_queries, square=version, apgd=version)
        robust, _ = ev.run_batches(ev.clean, x, y)
        parts = {}
        for name in ("apgd-ce", "apgd-t", "square"):
            idx = np.flatnonzero(robust)
            outcome, seconds = ev.run_batches(ev.resolve(name), x[idx], y[idx]) if len(idx) else ([], 0.0)
            robust[idx] = outcome
            parts[name] = (robust.mean(), seconds)
        results[version] = parts
    return results


@cli.one_line_errors
def main(argv=None):
    """Print one row per run and sequence."""
    args = build_parser().parse_args(argv)
    cli.import_tensorflow()
    print(f"n = {args.n_examples}, Square queries = {args.square_queries}; seconds per 1000 examples")
    print("| run | attacks | APGD-CE s | APGD-T s | Square s | AutoAttack s | AA robust acc % |")
    print("|---" * 7 + "|")
    for run_dir in args.run_dirs:
        results = measure(run_dir, args.n_examples, args.square_queries, args.batch_size)
        total = {}
        for version, label in (("art", "ART"), ("tf", "bcs_tf in-graph")):
            parts = results[version]
            per_1000 = {k: 1000 * s / args.n_examples for k, (_, s) in parts.items()}
            total[version] = sum(per_1000.values())
            print(f"| {run_dir} | {label} | {per_1000['apgd-ce']:.0f} | {per_1000['apgd-t']:.0f} | "
                  f"{per_1000['square']:.0f} | {total[version]:.0f} | {100 * parts['square'][0]:.1f} |", flush=True)
        delta = 100 * (results["tf"]["square"][0] - results["art"]["square"][0])
        print(f"| {run_dir} | in-graph / ART | | | | {total['tf'] / total['art']:.2f} "
              f"({total['art'] / total['tf']:.2f}× faster) | {delta:+.1f} points |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
