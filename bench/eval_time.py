"""AutoAttack's cost and result with bcs_tf's in-graph Square against ART's Square (not a test).

For each run, on the same first ``--n-examples`` test images: APGD-CE, then APGD-T on its survivors (shared by
both sequences, as the standard AutoAttack runs them), then Square on the survivors twice — ART's and bcs_tf's,
with the same query budget. Prints per run the seconds per 1000 examples of each part and of the two whole
sequences, their robust accuracies and the differences, all measured in one run. Targets: the in-graph
sequence ≤ 300 s per 1000 examples for small_cnn, robust accuracy within 0.5 points of the ART sequence.

    python -m bench.eval_time RUN_DIR [RUN_DIR ...] [--n-examples 1000] [--square-queries 5000]
"""

from __future__ import annotations

import sys
import time

from training import cli


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
    """``{part: (robust fraction, seconds)}`` for one run (see the module docstring)."""
    import numpy as np

    from bcs_tf.data import load_dataset
    from training.attack_suite import Evaluator
    from training.config import load_finished_run

    cfg, net = load_finished_run(run_dir)
    data = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
    x, y = data.x_test[:n_examples], data.y_test[:n_examples]
    parts = {}
    evaluators = {v: Evaluator(net, cfg.eps, data.num_classes, batch_size, seed=cfg.seed, verbose=0,
                               square_queries=square_queries, square=v) for v in ("art", "tf")}
    ev = evaluators["tf"]
    robust, _ = ev.run_batches(ev.clean, x, y)
    parts["clean"] = (robust.mean(), 0.0)
    for name in ("apgd-ce", "apgd-t"):
        idx = np.flatnonzero(robust)
        outcome, seconds = ev.run_batches(ev.resolve(name), x[idx], y[idx])
        robust[idx] = outcome
        parts[name] = (robust.mean(), seconds)
    idx = np.flatnonzero(robust)
    for version, evaluator in evaluators.items():
        start = time.time()
        outcome = evaluator.square(x[idx], y[idx]) if len(idx) else np.zeros(0, bool)
        survived = robust.copy()
        survived[idx] = outcome
        parts[f"square-{version}"] = (survived.mean(), time.time() - start)
    return parts


@cli.one_line_errors
def main(argv=None):
    """Print one row per run and sequence."""
    args = build_parser().parse_args(argv)
    cli.import_tensorflow()
    print(f"n = {args.n_examples}, Square queries = {args.square_queries}; seconds per 1000 examples")
    print("| run | APGD-CE s | APGD-T s | Square ART s | Square tf s | AA (ART Square) s | AA (tf Square) s | "
          "speed-up | AA acc ART % | AA acc tf % | tf − ART points |")
    print("|---" * 11 + "|")
    for run_dir in args.run_dirs:
        parts = measure(run_dir, args.n_examples, args.square_queries, args.batch_size)
        per_1000 = {k: 1000 * s / args.n_examples for k, (_, s) in parts.items()}
        gradient = per_1000["apgd-ce"] + per_1000["apgd-t"]
        art, tf_ = gradient + per_1000["square-art"], gradient + per_1000["square-tf"]
        acc_art, acc_tf = 100 * parts["square-art"][0], 100 * parts["square-tf"][0]
        print(f"| {run_dir} | {per_1000['apgd-ce']:.0f} | {per_1000['apgd-t']:.0f} | {per_1000['square-art']:.0f} | "
              f"{per_1000['square-tf']:.0f} | {art:.0f} | {tf_:.0f} | {art / tf_:.2f}× | {acc_art:.1f} | "
              f"{acc_tf:.1f} | {acc_tf - acc_art:+.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
