"""``python -m training.evaluate RUN_DIR --attacks clean,pgd50,autoattack``: a trained run's accuracy under attacks.

The attacks run through ``bcs_tf.robustness.Evaluator``: FGSM, PGD, APGD-CE, APGD-T and Square are in-graph
(PGD with ``--restarts`` keeps the worst case per example; ``--apgd art`` / ``--square art`` use the
adversarial-robustness-toolbox's instead); the Brendel & Bethge L∞ attack comes from foolbox 3. AutoAttack is by
default the standard sequence APGD-CE → APGD-T → Square, each run on the examples that survived the previous
ones, with the accuracy left after each part stored (``--autoattack art`` uses ART's ``AutoAttack`` class, which
runs a larger, slower set). Writes ``eval.json`` after every attack (``--resume`` continues an interrupted
evaluation) and ``eval.md`` (the rows of the paper's HYDRA table), and checks the order
clean ≥ FGSM ≥ PGD-50 ≥ PGD-100 ≥ AA, warning (and exiting 3 with ``--strict``) on a violation beyond noise or
on AutoAttack far below PGD: both are signs of gradient masking.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

from bcs_run import cli
from bcs_run.attacks import ATTACK_NAMES, TABLE_ROWS, VERSION_USERS, order_check, parse_attacks
from bcs_run.config import finished_network
from bcs_run.rundir import atomic_write


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


def build_parser():
    """The ``training.evaluate`` parser."""
    p = cli.parser("python -m training.evaluate", __doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `python -m training.run`, or a "
                   "results directory's archived run (network.npz)")
    cli.add_weights(p)
    attack = p.add_argument_group("attack")
    attack.add_argument("--attacks", metavar="A1,A2", help=f"comma-separated, run in this order: {ATTACK_NAMES}",
                        default="clean,fgsm,pgd50,pgd100,apgd-ce,apgd-t,autoattack,bb")
    attack.add_argument("--eps", type=float, metavar="X", default=None,
                        help="L∞ radius (default: the run's training eps)")
    attack.add_argument("--restarts", type=cli.positive(int), metavar="N", default=1,
                        help="random restarts for PGD and APGD")
    attack.add_argument("--square-queries", type=cli.positive(int), metavar="N", default=5000,
                        help="query budget of Square")
    attack.add_argument("--square", choices=("tf", "art"), default="tf",
                        help="Square attack: bcs_tf's in-graph, batched one, or ART's (for comparison)")
    attack.add_argument("--apgd", choices=("tf", "art"), default="tf",
                        help="APGD-CE / APGD-T: bcs_tf's in-graph ones (APGD-T's 9 targets batched), or ART's")
    attack.add_argument("--autoattack", choices=("standard", "art"), default="standard",
                        help="standard: APGD-CE → APGD-T → Square on survivors; art: ART's AutoAttack class")
    data = p.add_argument_group("data")
    data.add_argument("--n-examples", type=cli.positive(int), metavar="N", default=None,
                      help="evaluate the first N test examples (default: all)")
    data.add_argument("--batch-size", type=cli.positive(int), metavar="N", default=256,
                      help="examples per attack batch")
    out = p.add_argument_group("output")
    out.add_argument("--name", metavar="NAME", default=None, help="report file stem in the run directory "
                     "(NAME.json, NAME.md), e.g. to keep a costly AutoAttack on fewer examples beside eval.json "
                     "(default: eval; eval_last with --weights last)")
    mode = out.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing NAME.json / NAME.md")
    mode.add_argument("--resume", action="store_true",
                      help="keep the attacks an existing NAME.json (same settings) holds and run the rest")
    out.add_argument("--strict", action="store_true", help="exit 3 when the order check fails")
    cli.add_verbose(out)
    out.add_argument("--no-report", action="store_true", help="skip report.md and the figures of the run")
    return p


def check_args(args):
    """Everything about the flags that can be checked without TensorFlow; returns the attack names."""
    names = parse_attacks(args.attacks)
    args.name = args.name or ("eval_last" if args.weights == "last" else "eval")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        raise cli.FlagError(f"--name: letters, digits, '_', '.', '-' only. Received: {args.name!r}")
    if args.eps is not None and args.eps < 0:
        raise cli.FlagError(f"--eps must be ≥ 0. Received: {args.eps}")
    run_dir = pathlib.Path(args.run_dir)
    if finished_network(run_dir) is None:
        raise cli.FlagError(f"{run_dir} has no model.keras or network.npz (is it a finished `training.run` output "
                            "or an archived run of a results directory?)")
    cli.check_weights(args, run_dir)
    out_json, out_md = run_dir / f"{args.name}.json", run_dir / f"{args.name}.md"
    if (out_json.exists() or out_md.exists()) and not (args.overwrite or args.resume):
        raise cli.FlagError(f"{out_json} exists; pass --resume to continue it or --overwrite to replace it")
    return names


@cli.one_line_errors
def main(argv=None):
    """CLI entry point: flags checked before TensorFlow loads; one-line errors (exit 2) for bad input."""
    args = build_parser().parse_args(argv)
    names = check_args(args)
    cli.import_tensorflow(args.verbose)
    code = evaluate(args, names)
    if not args.no_report:
        from training.report import write_reports

        write_reports([args.run_dir])
    return code


def _previous_results(out_json, settings):
    """Attack results of an earlier evaluation with the same settings (for ``--resume``)."""
    try:
        report = json.loads(out_json.read_text())
    except (OSError, ValueError) as exc:
        raise cli.FlagError(f"--resume: cannot read {out_json} ({exc}); use --overwrite to start afresh") from exc
    # reports from before the in-graph attacks used ART's, and before --weights, the selected network
    saved = {"square": "art", "apgd": "art", "weights": "selected", **report}
    # the network, not where it lies: an archived run (results/*/runs/ID) resumes the report made in its run directory
    differs = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v and k != "run_dir"}
    kept = report.get("attacks", {})
    for version, attacks in VERSION_USERS.items():
        if version in differs and not any(a in kept for a in attacks):
            del differs[version]  # no kept result depends on which implementation ran
    if differs:
        raise cli.FlagError(f"--resume: {out_json} was made with other settings (saved, now): {differs}; "
                          "use --overwrite to start afresh")
    return report.get("attacks", {})


def evaluate(args, names):
    """Evaluate a run directory with the attacks ``names``; returns the exit code. ``NAME.json`` is rewritten
    after every attack."""
    from bcs_tf.data import load_dataset
    from bcs_run.config import load_finished_run

    from bcs_tf.robustness import Evaluator

    with cli.native_output(args.verbose):  # ART's import warns that PyTorch is absent
        import bcs_tf.robustness.art  # noqa: F401  (once, up front: it closes the logging streams that exist)

    run_dir = pathlib.Path(args.run_dir)
    out_json, out_md = run_dir / f"{args.name}.json", run_dir / f"{args.name}.md"
    cfg, net = load_finished_run(run_dir)
    cli.load_weights(args, run_dir, net)
    eps = cfg.eps if args.eps is None else args.eps
    data = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
    if args.n_examples is not None and args.n_examples > len(data.x_test):
        raise cli.FlagError(f"--n-examples: the {cfg.dataset} test set has {len(data.x_test)} examples. "
                            f"Received: {args.n_examples}")
    ev = Evaluator(net, eps, data.num_classes, args.batch_size, args.restarts, cfg.seed, args.square_queries,
                   args.verbose, autoattack=args.autoattack, square=args.square, apgd=args.apgd)
    x, y = data.x_test[: args.n_examples], data.y_test[: args.n_examples]
    settings = {"run_dir": str(run_dir), "weights": args.weights, "eps": eps, "restarts": args.restarts,
                "n_examples": int(len(x)), "square_queries": args.square_queries, "autoattack": args.autoattack,
                "square": args.square, "apgd": args.apgd}
    results = _previous_results(out_json, settings) if args.resume and out_json.exists() else {}
    for name in names:
        if name in results:
            print(f"{name}: kept from {out_json}")
            continue
        acc, seconds = ev.run(name, x, y)
        results[name] = {"accuracy": acc, "n": int(len(x)), "seconds": seconds,
                         "seconds_per_1000": 1000 * seconds / len(x)}
        if name == "autoattack" and args.autoattack == "standard":  # what each part took: accuracy left after it
            results[name]["after"] = dict(ev.stages)
        _write_report(out_json, out_md, settings, results)
    problems = _write_report(out_json, out_md, settings, results)
    print(out_md.read_text())
    for problem in problems:
        print(f"WARNING (possible gradient masking): {problem}", file=sys.stderr)
    return 3 if problems and args.strict else 0


def _write_report(out_json, out_md, settings, results):
    """Write eval.json and eval.md atomically; returns the order-check problems."""
    problems = order_check(results, settings["n_examples"])
    square = "bcs_tf's in-graph Square" if settings["square"] == "tf" else "ART's Square"
    apgd = "bcs_tf's in-graph" if settings.get("apgd", "art") == "tf" else "ART's"
    aa = (f"{apgd} APGD-CE → APGD-T (DLR, top-9 targets) → {square}, each on the survivors; FAB-T is left out"
          if settings["autoattack"] == "standard" else
          "ART AutoAttack: APGD-CE, APGD-DLR, Square untargeted, then APGD-CE and APGD-DLR against every class")
    report = {**settings, "attacks": results, "order_check": {"ok": not problems, "problems": problems},
              "notes": f"AutoAttack = {aa}"}
    for path, text in ((out_json, json.dumps(report, indent=1)),
                       (out_md, markdown_table(results, settings["eps"], settings["n_examples"]))):
        atomic_write(path, text)
    return problems


if __name__ == "__main__":
    sys.exit(main())
