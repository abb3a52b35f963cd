"""Whether training runs at once beat runs one after another on this machine (not a test): the question behind
``training.reproduce --jobs``. The same short runs (real Fashion-MNIST, AT, BCS 99%, start-up and the test
evaluation included, as in a table) are made twice: one at a time with all cores' threads, then ``--jobs`` at a
time with cores ÷ jobs threads each. Prints both wall times and their ratio, measured in one invocation.

    python -m bench.parallel_runs [--runs 4] [--jobs 2] [--steps 150] [--objective at]
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time

from bcs_run import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def commands(n, steps, objective, folder):
    """``n`` training command lines (seeds 0..n-1), each ``steps`` optimizer steps."""
    return [[sys.executable, "-m", "training.run", "--dataset", "fashion_mnist", "--objective", objective,
             "--method", "bcs", "--connectivity", "0.01", "--epochs", "1", "--max-steps", str(steps),
             "--val-split", "1000", "--seed", str(seed), "--no-report", "--verbose", "0",
             "--out", str(pathlib.Path(folder) / f"run{seed}")] for seed in range(n)]


def wall_seconds(cmds, jobs, threads):
    """Seconds to finish ``cmds`` with at most ``jobs`` processes at once, ``threads`` threads each."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "TF_NUM_INTRAOP_THREADS": str(threads),
           "TF_NUM_INTEROP_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    queue, running, t0 = list(cmds), [], time.time()
    while queue or running:
        while queue and len(running) < jobs:
            running.append(subprocess.Popen(queue.pop(0), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True))
        proc = running.pop(0)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"error: a training run failed: {err.strip().splitlines()[-1:]}")
    return time.time() - t0


@cli.one_line_errors
def main(argv=None):
    """Time the runs one at a time and ``--jobs`` at a time; print the ratio."""
    p = cli.parser("python -m bench.parallel_runs", __doc__)
    p.add_argument("--runs", type=cli.positive(int), default=4, help="training runs in each batch")
    p.add_argument("--jobs", type=cli.positive(int), default=2, help="runs at once in the second batch")
    p.add_argument("--steps", type=cli.positive(int), default=150, help="optimizer steps per run")
    p.add_argument("--objective", default="at", help="training objective of every run")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    rows = []
    for jobs, threads in ((1, cores), (args.jobs, max(1, cores // args.jobs))):
        with tempfile.TemporaryDirectory() as folder:
            seconds = wall_seconds(commands(args.runs, args.steps, args.objective, folder), jobs, threads)
        rows.append((jobs, threads, seconds))
        print(f"jobs {jobs}, {threads} thread(s) each: {seconds:.1f} s for {args.runs} runs", flush=True)
    (_, _, one), (_, _, many) = rows
    print(f"\n| jobs × threads | wall s ({args.runs} runs of {args.steps} {args.objective} steps) |\n|---|---|")
    for jobs, threads, seconds in rows:
        print(f"| {jobs} × {threads} | {seconds:.1f} |")
    print(f"\njobs {args.jobs} / jobs 1 wall time: {many / one:.2f} ({cores} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
