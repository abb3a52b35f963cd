"""Running a plan: one training or evaluation process at a time, each supervised (its time written to the
manifest as it runs, stopped with its parent), what each run still needs worked out from the run directories and
the results directory, and every finished run collected (metrics, reports, archived network) into ``--out``."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import time

from bcs_run import cli
from bcs_run.rundir import RunDir, atomic_write
from training.plan import AA_ATTACKS, eval_commands, train_command

ROOT = pathlib.Path(__file__).resolve().parent.parent
# how often a training run's time so far is written to the manifest (what a SIGKILL can lose); tests shorten it
HEARTBEAT_SECONDS = float(os.environ.get("BCS_TF_HEARTBEAT_SECONDS", 30))


def _commit(out=None):
    """HEAD, with ``-dirty`` when tracked files other than the results directory ``out`` have changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        inside = out is not None and ROOT in pathlib.Path(out).resolve().parents
        spec = ["--", ".", f":(exclude){pathlib.Path(out).resolve().relative_to(ROOT)}"] if inside else []
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *spec], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine():
    """The CPU model and core count: run times are only comparable on the same kind of machine."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _attacks_done(run_dir, spec):
    """Whether ``run_dir`` holds every report of ``spec`` with all of its attacks."""
    wanted = {"eval": spec.attacks, **({"eval_aa": AA_ATTACKS} if spec.aa else {})}
    for name, attacks in wanted.items():
        report = RunDir(run_dir).report(name) or {}
        if not all(a in report.get("attacks", {}) for a in attacks):
            return False
    return True


def _die_with_parent():
    """In the child, before it runs (Linux): SIGTERM when ``reproduce`` dies, even by SIGKILL, rather than a
    training run going on alone and holding its directory while the job is started again."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _call(cmd, log, tick=None):
    """Run ``cmd`` with its output appended to ``log``; while it runs, ``tick(seconds so far)`` is called every
    :data:`HEARTBEAT_SECONDS`, so a run's time survives this process being killed outright (SIGKILL)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            while True:
                try:
                    return subprocess.CompletedProcess(cmd, proc.wait(timeout=HEARTBEAT_SECONDS))
                except subprocess.TimeoutExpired:
                    if tick is not None:
                        tick(time.time() - t0)
        except BaseException:  # Ctrl-C, SIGTERM: no training process is left behind
            proc.kill()
            proc.wait()
            raise


class Manifest:
    """``manifest.json``: the settings of the results directory and every run's command, commit and times."""

    def __init__(self, path, settings):
        self.path = path
        self.data = {"settings": settings, "runs": {}}
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except ValueError as exc:
                raise cli.FlagError(f"{path} is not readable JSON ({exc}); move it away to start afresh") from None
            if saved.get("settings") != settings:
                diff = {k: (saved.get("settings", {}).get(k), v) for k, v in settings.items()
                        if saved.get("settings", {}).get(k) != v}
                raise cli.FlagError(f"--out: {path.parent} was made with other settings (saved, now): {diff}; "
                                  "use another --out")
            self.data = saved

    def record(self, rid, **entry):
        self.data["runs"].setdefault(rid, {}).update(entry)
        self.save()

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.data, indent=1))


def _states(specs, runs_dir, out, manifest):
    """What each run still needs: ``done``, ``collected`` (its results are in ``out`` but its run directory is
    not here, e.g. on a new machine), ``evaluate``, ``resume`` or ``train``.

    A collected run is trained again only when a run still to be trained needs more of it than its archived
    network (a rewound lottery ticket reads the source's epoch snapshots); the other runs start from the archive."""
    states = {}
    for spec in specs:
        run_dir = runs_dir / spec.id
        if RunDir(run_dir).is_complete():
            done = _attacks_done(run_dir, spec) and RunDir(run_dir).archive.is_file()
            states[spec.id] = "done" if done else "evaluate"
        elif (manifest.data["runs"].get(spec.id, {}).get("status") == "finished"
              and RunDir(out / "runs" / spec.id).metrics.is_file()
              and _attacks_done(out / "runs" / spec.id, spec)):
            states[spec.id] = "collected"
        else:
            states[spec.id] = "resume" if RunDir(run_dir).config.is_file() else "train"
    for spec in reversed(specs):  # sources come before the runs that start from them
        if states[spec.id] in ("resume", "train"):
            for dep in spec.deps:
                if states[dep] == "collected" and spec.needs_source_run:
                    states[dep] = "train"
    return states


def run_seconds(entry):
    """A manifest entry's cost: its training processes (or, for entries older than that record, the final
    process's wall time) and its evaluation."""
    return entry.get("process_seconds", entry.get("wall_seconds", 0.0)) + entry.get("eval_seconds", 0.0)


def execute(the_plan, runs_dir, out, manifest, dry_run=False, collected=None):
    """Train and evaluate every planned run that is not done, calling ``collected()`` after each run whose results
    reach ``out``; returns ``(ids that failed, stopped)``, stopped when Ctrl-C or SIGTERM ended it early (the run
    it was training is recorded as stopped)."""
    failed = []
    try:
        _execute(the_plan, runs_dir, out, manifest, dry_run, failed, collected)
    except KeyboardInterrupt:
        print("stopped: the same command goes on from here (the stopped run resumes from its last checkpoint)")
        return failed, True
    return failed, False


def _execute(the_plan, runs_dir, out, manifest, dry_run, failed, collected):
    """:func:`execute`'s loop over the runs; appends the ids that fail to ``failed``."""
    specs = list(the_plan.runs.values())
    states = _states(specs, runs_dir, out, manifest)
    n = len(specs)
    total_cost = sum(s.cost for s in specs)
    # the seconds per AT-epoch unit measured by earlier invocations seed the ETA
    earlier = [s for s in specs if manifest.data["runs"].get(s.id, {}).get("status") == "finished"]
    seconds = sum(run_seconds(manifest.data["runs"][s.id]) for s in earlier)
    measured_cost = sum(s.cost for s in earlier) if seconds else 0.0
    done_cost = 0.0
    here_seconds = here_cost = 0.0  # this invocation's runs: the machine's load now, once one has trained
    for i, spec in enumerate(specs, start=1):
        run_dir, state = runs_dir / spec.id, states[spec.id]
        if here_cost:
            rate = here_seconds / here_cost
        else:
            rate = seconds / measured_cost if measured_cost else 45.0
        eta = (total_cost - done_cost) * rate
        print(f"[{i}/{n}] {spec.id}: {state}  (ETA of the rest ≈ {eta / 60:.0f} min)", flush=True)
        done_cost += spec.cost
        if state == "collected":
            continue
        train_cmd = train_command(spec, runs_dir, {dep: out / "runs" / dep for dep in spec.deps
                                                   if states[dep] == "collected"})
        if state in ("resume", "train"):
            if any(dep in failed for dep in spec.deps):
                print(f"    skipped: it starts from a failed run ({', '.join(spec.deps)})")
                failed.append(spec.id)
                continue
            if dry_run:
                continue
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            cmd = train_cmd + (["--resume"] if state == "resume" else [])
            entry = manifest.data["runs"].get(spec.id, {})
            machines = entry.get("machines", [])
            if state == "train" and entry.get("process_seconds"):
                # an earlier process's checkpoint is gone: its time is set apart, not counted as this run's cost
                manifest.record(spec.id, process_seconds=0.0, discarded_seconds=entry.get(
                    "discarded_seconds", 0.0) + entry["process_seconds"])
                machines = []
            manifest.record(spec.id, status="running", command=_display(train_cmd), commit=_commit(out),
                            machines=sorted(set(machines) | {_machine()}))
            t0, spent = time.time(), manifest.data["runs"][spec.id].get("process_seconds", 0.0)
            try:
                result = _call(cmd, runs_dir / f"{spec.id}.log",
                               tick=lambda seconds: manifest.record(spec.id, process_seconds=spent + seconds))
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run resumes from its checkpoint next time
                manifest.record(spec.id, status="stopped")
                raise
            finally:
                wall = time.time() - t0
                # every training process of the run, a stopped one included: what the run cost on this machine
                manifest.record(spec.id, process_seconds=spent + wall)
            if result.returncode != 0:
                print(f"    training failed (exit {result.returncode}); see {runs_dir / spec.id}.log")
                failed.append(spec.id)
                manifest.record(spec.id, status="failed", command=_display(train_cmd), commit=_commit(out))
                continue
            # the run's whole training time, not just this process's: a resumed run's full cost is counted
            here_seconds, here_cost = here_seconds + spent + wall, here_cost + spec.cost
        if dry_run:
            continue
        evals = eval_commands(spec, runs_dir, the_plan.p)
        if state != "done" and not _evaluate(spec, runs_dir, manifest, evals):
            failed.append(spec.id)
            continue
        _collect(spec, runs_dir, out, manifest, train_cmd, evals)
        if collected is not None:
            collected()


def _evaluate(spec, runs_dir, manifest, evals):
    """Run the evaluations of ``spec`` (each resumes what an earlier one wrote) and archive its network; returns
    whether all succeeded."""
    log = runs_dir / f"{spec.id}.log"
    t0, spent = time.time(), manifest.data["runs"].get(spec.id, {}).get("eval_seconds", 0.0)
    try:
        for name, cmd in evals.items():
            result = _call(cmd, log)
            if result.returncode not in (0, 3):  # 3 = order-check warning, reported in the report itself
                print(f"    evaluation {name} failed (exit {result.returncode}); see {log}")
                return False
        if not RunDir(runs_dir / spec.id).archive.is_file():
            result = _call([sys.executable, "-m", "training.archive", str(runs_dir / spec.id), "--verbose", "2"], log)
            if result.returncode != 0:
                print(f"    archiving the network failed (exit {result.returncode}); see {log}")
                return False
    finally:
        manifest.record(spec.id, eval_seconds=spent + time.time() - t0)
    return True


def _display(cmd):
    """A command line as a user would type it from the repository root."""
    return " ".join(["python"] + [str(c).replace(str(ROOT) + os.sep, "") for c in cmd[1:]])


def _collect(spec, runs_dir, out, manifest, train_cmd, evals):
    """Copy the run's metrics, evaluations and archived network into ``out/runs/ID`` and record the run in the
    manifest."""
    run_dir, dest = runs_dir / spec.id, out / "runs" / spec.id
    dest.mkdir(parents=True, exist_ok=True)
    run = RunDir(run_dir)
    for path in [run.metrics, run.archive, *run_dir.glob("eval*.json"), *run_dir.glob("eval*.md")]:
        if path.is_file():  # eval.json, and any extra report such as eval_aa.json (training.evaluate --name)
            shutil.copyfile(path, dest / path.name)
    metrics = json.loads(run.metrics.read_text())
    entry = manifest.data["runs"].get(spec.id, {})
    manifest.record(spec.id, status="finished", command=_display(train_cmd),
                    evaluate=" && ".join(_display(cmd) for cmd in evals.values()),
                    commit=entry.get("commit") or _commit(out), train_seconds=metrics["train_seconds"],
                    wall_seconds=metrics["wall_seconds"])


