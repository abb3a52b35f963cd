"""``python -m training.reproduce --table {bcs,hydra,sparsity,all}``: every run a table of the two seed papers
needs, in dependency order, each trained, evaluated and collected into tables and figures.

Runs live in ``--runs-dir`` (default ``runs/reproduce/DATASET-PRESET``): a finished run is skipped, a stopped
one resumed, and the evaluation continues where it stopped. ``--out`` receives ``table_*.md``, the figures,
each run's ``metrics.json`` / ``eval.json`` and ``manifest.json`` (every run's command, commit and wall time);
the tables are made from it alone, so a reproduction can go on on another machine from a committed ``--out``
(runs collected there are not trained again: a run that starts from one reads its archived network, and only a
rewound lottery ticket, which needs epoch snapshots, trains its source again). ``--jobs N`` runs up to N runs at
once, each after its sources. A results directory made with other settings (dataset or preset) is refused.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time

from bcs_run import cli
from bcs_run.config import DATASET_NAMES
from training.jobs import Manifest, execute, git_commit, run_seconds
from training.plan import AA_SCOPES, FULL_ATTACKS, PRESETS, TABLES, plan


def build_parser():
    """The ``training.reproduce`` parser."""
    p = cli.parser("python -m training.reproduce", __doc__)
    p.add_argument("--table", default="bcs", help=f"comma-separated tables: {', '.join(TABLES)}, or all")
    p.add_argument("--dataset", default="fashion_mnist", choices=DATASET_NAMES, help="dataset of every run")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="run lengths: quick (5 epochs, ≈ 83 min for the BCS table here), full (20 epochs, all "
                   "five objectives), smoke (seconds, for tests)")
    p.add_argument("--seeds", type=cli.positive(int), default=None,
                   help="seeds per cell (mean ± std and paired intervals when > 1); default: the preset's (quick 3, "
                   "else 1)")
    p.add_argument("--full-eval", action="store_true",
                   help=f"evaluate every run with {', '.join(FULL_ATTACKS)} (default: clean and PGD-50)")
    p.add_argument("--aa", choices=AA_SCOPES, default="preset",
                   help="AutoAttack (eval_aa.json, 1,000 test images): the preset's choice (quick: robust 99%% models "
                   "and 90%% BCS/Fixed/HYDRA; full: none), 99 (robust 99%% models only; a collected run without it "
                   "is trained again), or none")
    p.add_argument("--out", default=None, help="results directory (default: results/DATASET-PRESET)")
    p.add_argument("--runs-dir", default=None, help="run directories (default: runs/reproduce/DATASET-PRESET)")
    p.add_argument("--jobs", type=cli.positive(int), default=1, metavar="N",
                   help="runs at once, each started when its sources have finished (training and evaluation "
                   "processes; docs/benchmarks.md measures 2 against 1 on 2 cores)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: processes on this machine (--jobs); ray: every run a Ray task on a local Ray cluster "
                   "or the one at --address (pip install 'bcs-tf[ray]'; docs/reproduce.md)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --executor ray: the cluster to join (e.g. HEAD_IP:6379, or auto); default: start a "
                   "local one on this machine")
    p.add_argument("--threads", type=cli.positive(int), default=None, metavar="N",
                   help="TensorFlow intra- and inter-op threads of each process, and a Ray task's CPUs (default: "
                   "all cores with --jobs 1, cores ÷ N with --jobs N, 1 with Ray)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what is done, train nothing")
    return p


def _summarise(tables, the_plan, out, manifest):
    """Write the tables and figures from the runs collected so far and the manifest's ``measured`` sums; returns
    the paths written."""
    from training.tables import write_tables

    written = write_tables(tables, the_plan, out)
    finished = [entry for entry in manifest.data["runs"].values() if entry.get("status") == "finished"]
    manifest.data["measured"] = {"finished_runs": len(finished),
                                 "seconds": round(sum(run_seconds(entry) for entry in finished), 1),
                                 "discarded_seconds": round(sum(entry.get("discarded_seconds", 0.0)
                                                                for entry in manifest.data["runs"].values()), 1)}
    manifest.save()
    return written


@cli.one_line_errors
def main(argv=None):
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    tables = TABLES if args.table == "all" else tuple(t.strip() for t in args.table.split(",") if t.strip())
    unknown = [t for t in tables if t not in TABLES]
    if unknown or not tables:
        raise cli.FlagError(f"--table: choose from {', '.join(TABLES)} or all. Received: {args.table!r}")
    if args.executor == "ray" and args.jobs != 1:
        raise cli.FlagError("--jobs is for --executor local; with Ray as many runs go at once as the cluster has "
                            "CPUs for (--threads each)")
    if args.address and args.executor != "ray":
        raise cli.FlagError("--address: only with --executor ray")
    out = pathlib.Path(args.out or f"results/{args.dataset}-{args.preset}")
    runs_dir = pathlib.Path(args.runs_dir or f"runs/reproduce/{args.dataset}-{args.preset}").resolve()
    settings = {"dataset": args.dataset, "preset": args.preset, **{k: list(v) if isinstance(v, tuple) else v
                                                                    for k, v in PRESETS[args.preset].items()}}
    manifest = Manifest(out / "manifest.json", settings)
    the_plan = plan(tables, args.dataset, args.preset, args.seeds, args.full_eval, args.aa)
    print(f"{len(the_plan.runs)} runs for table(s) {', '.join(tables)} ({args.preset} preset) in {runs_dir}")
    t0 = time.time()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` (e.g. a session's end) stops as Ctrl-C does
    if args.dry_run:
        execute(the_plan, runs_dir, out, manifest, dry_run=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with cli.exclusive(out, "--out"):  # one job per results directory: two would overwrite each other's manifest
        return _reproduce(args, tables, the_plan, runs_dir, out, manifest, t0)


def _reproduce(args, tables, the_plan, runs_dir, out, manifest, t0):
    """:func:`main` once the plan is made and ``out`` is locked: every run, then the tables and the sums."""
    # tables and sums after every collected run, so a job killed outright still leaves them up to date
    collected = lambda: _summarise(tables, the_plan, out, manifest)  # noqa: E731
    if args.executor == "ray":
        from training import ray_jobs

        threads = args.threads or 1
        failed, stopped = ray_jobs.execute(the_plan, runs_dir, out, manifest, collected, threads, args.address)
    else:
        threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None)
        failed, stopped = execute(the_plan, runs_dir, out, manifest, collected=collected, jobs=args.jobs,
                                  threads=threads)
    written = _summarise(tables, the_plan, out, manifest)
    manifest.data.setdefault("invocations", []).append(
        {"tables": list(tables), "seeds": args.seeds, "full_eval": args.full_eval, "aa": args.aa,
         "executor": args.executor, "jobs": args.jobs, "threads": threads, "commit": git_commit(out),
         "wall_seconds": time.time() - t0, "failed": failed, "stopped": stopped})
    manifest.save()
    measured = manifest.data["measured"]
    print(f"{measured['finished_runs']} finished runs took {measured['seconds'] / 3600:.2f} h here in all")
    print(f"wrote {', '.join(str(w) for w in written)}; {len(failed)} run(s) failed" if failed else
          f"wrote {', '.join(str(w) for w in written)}")
    return 130 if stopped else 1 if failed else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
