"""Running a plan: up to ``jobs`` runs at once, each started once its sources have finished, each a sequence of
supervised processes (training, evaluations, archive: time written to the manifest as they run, stopped with
their parent, a killed training process retried from its checkpoint); what each run still needs worked out from
the run directories and the results directory, and every finished run collected (metrics, reports, archived
network) into ``--out``. The driver alone writes the manifest and, through ``collected``, the tables."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from bcs_run import cli
from bcs_run.rundir import RunDir, atomic_write
from training.plan import eval_commands, train_command

ROOT = pathlib.Path(__file__).resolve().parent.parent
# how often a training run's time so far is written to the manifest (what a SIGKILL can lose); tests shorten it
HEARTBEAT_SECONDS = float(os.environ.get("BCS_TF_HEARTBEAT_SECONDS", 30))
RETRIES = 2  # a training process killed by a signal (not by this driver) is resumed this many times
_children = set()  # the processes running now, killed when the driver stops
_children_lock = threading.Lock()
_stop = threading.Event()  # set when the driver stops: no worker starts another process


class _Stopped(Exception):
    """A worker's process was killed, or not started, because the driver is stopping."""


def git_commit(out=None):
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


def missing_attacks(run_dir, spec):
    """The attacks of ``spec``'s reports that ``run_dir`` does not hold yet."""
    missing = []
    for name, attacks in spec.reports.items():
        report = RunDir(run_dir).report(name) or {}
        missing += [a for a in attacks if a not in report.get("attacks", {})]
    return tuple(missing)


def _attacks_done(run_dir, spec):
    """Whether ``run_dir`` holds every report of ``spec`` with all of its attacks."""
    return not missing_attacks(run_dir, spec)


def update_entry(entry, changes):
    """``entry.update(changes)``, where a value of None removes the key."""
    for key, value in changes.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value


def _wait_unlocked(run_dir, seconds=120):
    """Wait until no process holds ``run_dir`` (a killed supervisor's training process may still be exiting)."""
    deadline = time.time() + seconds
    while run_dir.is_dir():
        try:
            with cli.exclusive(run_dir, "--out"):
                return
        except cli.FlagError:
            if time.time() > deadline:
                return  # training.run names the holder in its own error
            time.sleep(0.2)


def _die_with_parent():
    """In the child, before it runs (Linux): SIGTERM when ``reproduce`` dies, even by SIGKILL, rather than a
    training run going on alone and holding its directory while the job is started again."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def call(cmd, log, tick=None, threads=None):
    """Run ``cmd`` (a child of this driver: killed when it stops) with its output appended to ``log``; while it
    runs, ``tick(seconds so far)`` is called every :data:`HEARTBEAT_SECONDS`, so a run's time survives this
    process being killed outright (SIGKILL).
    ``threads``: TensorFlow's intra- and inter-op threads (and OpenMP's) in the child."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    if threads:
        env.update(TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS=str(threads),
                   OMP_NUM_THREADS=str(threads))
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        t0 = time.time()
        if _stop.is_set():
            raise _Stopped
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        with _children_lock:
            _children.add(proc)
        try:
            while True:
                try:
                    code = proc.wait(timeout=HEARTBEAT_SECONDS)
                    if _stop.is_set():
                        raise _Stopped
                    return subprocess.CompletedProcess(cmd, code)
                except subprocess.TimeoutExpired:
                    if tick is not None:
                        tick(time.time() - t0)
        except BaseException:  # Ctrl-C, SIGTERM: no training process is left behind
            proc.kill()
            proc.wait()
            raise
        finally:
            with _children_lock:
                _children.discard(proc)


def _kill_children():
    """Stop the workers: kill every process they are waiting on and let them start no other."""
    _stop.set()
    with _children_lock:
        for proc in _children:
            proc.kill()


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
        self._lock = threading.RLock()  # the workers record their runs' times as they go

    def entry(self, rid):
        """The manifest entry of run ``rid`` (empty when it has none)."""
        return self.data["runs"].get(rid, {})

    def record(self, rid, **entry):
        """Update run ``rid``'s entry (a value of None removes its key) and save."""
        with self._lock:
            update_entry(self.data["runs"].setdefault(rid, {}), entry)
            self.save()

    def save(self):
        """Write the manifest (atomically: a reader never sees half of it)."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(self.data, indent=1))


def run_states(specs, runs_dir, out, manifest):
    """What each run still needs: ``done``, ``collected`` (its results are in ``out`` but its run directory is
    not here, e.g. on a new machine), ``re-evaluate`` (collected, but the plan asks for attacks its reports lack:
    its archived network in ``out`` is attacked, not trained again), ``evaluate``, ``resume`` or ``train``.

    A collected run is trained again only when a run still to be trained needs more of it than ``out`` keeps: a
    run collected before archives existed has only its reports, and a rewound lottery ticket reads the source's
    weights of an early epoch, which only runs collected with their :attr:`RunSpec.snapshots` keep. The other runs
    start from the archive."""
    states = {}
    for spec in specs:
        run_dir, archived = runs_dir / spec.id, RunDir(out / "runs" / spec.id)
        if RunDir(run_dir).is_complete():
            done = _attacks_done(run_dir, spec) and RunDir(run_dir).archive.is_file()
            states[spec.id] = "done" if done else "evaluate"
        elif manifest.data["runs"].get(spec.id, {}).get("status") == "finished" and archived.metrics.is_file() \
                and (_attacks_done(archived.path, spec) or archived.archive.is_file()):
            states[spec.id] = "collected" if _attacks_done(archived.path, spec) else "re-evaluate"
        else:
            states[spec.id] = "resume" if RunDir(run_dir).config.is_file() else "train"
    for spec in reversed(specs):  # sources come before the runs that start from them
        if states[spec.id] in ("resume", "train"):
            for dep in spec.deps:
                if states[dep] in ARCHIVED and not _serves(RunDir(out / "runs" / dep), spec):
                    states[dep] = "train"
    return states


ARCHIVED = ("collected", "re-evaluate")  # the states of a run whose network is read from ``out``


def _serves(collected, spec):
    """Whether the collected run ``collected`` holds what ``spec`` reads of its source: the archived network and, for
    a rewound lottery ticket, the weights of its rewind epoch."""
    return collected.archive.is_file() and (spec.rewind_epoch is None
                                            or collected.snapshot(spec.rewind_epoch).is_file())


def run_seconds(entry):
    """A manifest entry's cost: its training processes (or, for entries older than that record, the final
    process's wall time) and its evaluation."""
    return entry.get("process_seconds", entry.get("wall_seconds", 0.0)) + entry.get("eval_seconds", 0.0)


def execute(the_plan, runs_dir, out, manifest, dry_run=False, collected=None, jobs=1, threads=None):
    """Train and evaluate every planned run that is not done, up to ``jobs`` at once (each process with
    ``threads`` TensorFlow threads), calling ``collected()`` after each run whose results reach ``out``; returns
    ``(ids that failed, stopped)``, stopped when Ctrl-C or SIGTERM ended it early (the runs in flight are
    recorded as stopped)."""
    failed = []
    try:
        _execute(the_plan, runs_dir, out, manifest, dry_run, failed, collected, jobs, threads)
    except KeyboardInterrupt:
        print("stopped: the same command goes on from here (a stopped run resumes from its last checkpoint)")
        return failed, True
    return failed, False


class Worker:
    """What runs one run, in a thread of the driver or in a Ray task: the plan's settings, the directories, every
    run's state and ``progress``, where the run's times and status go as they happen (the :class:`Manifest` itself,
    or a Ray task's progress file that the driver merges into it): anything with ``entry(rid)`` and
    ``record(rid, **entry)``."""

    def __init__(self, the_plan, runs_dir, out, progress, states, threads):
        self.p, self.runs_dir, self.out, self.progress = the_plan.p, runs_dir, out, progress
        self.states, self.threads = states, threads

    def base(self, spec):
        """The directory that holds ``spec``'s run as evaluated: the runs dir, or ``out/runs`` for a run whose
        archived network is re-evaluated there."""
        return self.out / "runs" if self.states[spec.id] == "re-evaluate" else self.runs_dir

    def commands(self, spec):
        """``(training command, {report name: evaluation command})`` of ``spec``."""
        train_cmd = train_command(spec, self.runs_dir, {dep: self.out / "runs" / dep for dep in spec.deps
                                                        if self.states[dep] in ARCHIVED})
        return train_cmd, eval_commands(spec, self.base(spec), self.p)

    def run(self, spec):
        """Train (when needed), evaluate and archive ``spec``; ``(ok, seconds)``: the run's whole cost (training
        and evaluation, as :func:`run_seconds` counts it) when it trained here, else None. The driver collects it."""
        try:
            return self._run(spec)
        except _Stopped:  # the driver is stopping: the run resumes next time
            return False, None

    def _run(self, spec):
        state = self.states[spec.id]
        if state in ("resume", "train"):  # a retried Ray task finds what its killed attempt left
            run = RunDir(self.runs_dir / spec.id)
            state = "evaluate" if run.is_complete() else "resume" if run.config.is_file() else state
        train_cmd, evals = self.commands(spec)
        seconds = None
        if state in ("resume", "train"):
            seconds = self._train(spec, state, train_cmd)
            if seconds is None:
                return False, None
        log = self.runs_dir / f"{spec.id}.log"
        if state != "done" and not _evaluate(spec, self.base(spec), log, self.progress, evals, self.threads):
            return False, seconds
        # the ETA's rate is per unit of RunSpec.cost, which counts the evaluation too
        return True, None if seconds is None else run_seconds(self.progress.entry(spec.id))

    def _train(self, spec, state, train_cmd):
        """The run's training processes (a killed one resumed up to :data:`RETRIES` times); the run's whole
        training time, or None when it failed."""
        progress, rid = self.progress, spec.id
        (self.runs_dir / rid).parent.mkdir(parents=True, exist_ok=True)
        entry = progress.entry(rid)
        machines = entry.get("machines", [])
        if state == "resume":
            _wait_unlocked(self.runs_dir / rid)
            if entry.get("process_started_at") is not None:
                # a training process died with its supervisor (a killed Ray worker, a driver killed outright)
                _count_killed(progress, rid, entry.get("process_seconds", 0.0) - entry["process_started_at"])
        if state == "train" and entry.get("process_seconds"):
            # an earlier process's checkpoint is gone: its time is set apart, not counted as this run's cost
            progress.record(rid, process_seconds=0.0, discarded_seconds=entry.get("discarded_seconds", 0.0)
                            + entry["process_seconds"])
            machines = []
        progress.record(rid, status="running", command=_display(train_cmd), commit=git_commit(self.out),
                        machines=sorted(set(machines) | {_machine()}))
        resume = state == "resume"
        for attempt in range(RETRIES + 1):
            t0, spent = time.time(), progress.entry(rid).get("process_seconds", 0.0)
            # set while the process runs: a supervisor killed with it leaves it, and the next attempt counts the loss
            progress.record(rid, process_started_at=spent)
            try:
                result = call(train_cmd + (["--resume"] if resume else []), self.runs_dir / f"{rid}.log",
                               tick=lambda seconds: progress.record(rid, process_seconds=spent + seconds),
                               threads=self.threads)
            except _Stopped:
                progress.record(rid, status="stopped")
                raise
            finally:
                # every training process of the run, a stopped or killed one included: what the run cost here
                progress.record(rid, process_seconds=spent + time.time() - t0, process_started_at=None)
            killed = result.returncode < 0 and (self.runs_dir / rid / RunDir.CONFIG).is_file()
            if result.returncode == 0 or not killed or attempt == RETRIES:
                break
            print(f"    {rid}: the training process was killed (signal {-result.returncode}); resuming from its "
                  "last checkpoint", flush=True)
            _count_killed(progress, rid, time.time() - t0)
            resume = True
        if result.returncode != 0:
            print(f"    {rid}: training failed (exit {result.returncode}); see {self.runs_dir / rid}.log", flush=True)
            progress.record(rid, status="failed", command=_display(train_cmd), commit=git_commit(self.out))
            return None
        # the run's whole training time, not just this process's: a resumed run's full cost is counted
        return progress.entry(rid)["process_seconds"]


class Eta:
    """The time the runs not yet started will take: seconds per cost unit (:attr:`RunSpec.cost`) measured on this
    invocation's trained runs (the machine's load now) once one has trained, else on the manifest's finished runs,
    else a guess; divided by the runs that go at once (``parallel``). With ``states`` (:func:`run_states`), a run
    re-evaluated in ``out`` counts only the attacks its reports there lack."""

    def __init__(self, specs, manifest, parallel=1, out=None, states=None):
        self.costs = {s.id: s.cost for s in specs}
        for s in specs:  # a re-evaluated run costs only the attacks it lacks
            if states and states[s.id] == "re-evaluate":
                self.costs[s.id] = s.attack_cost(missing_attacks(out / "runs" / s.id, s))
        self.total, self.parallel = sum(self.costs.values()), parallel
        self.position = {spec.id: i for i, spec in enumerate(specs, start=1)}
        earlier = [s for s in specs if manifest.entry(s.id).get("status") == "finished"]
        self.seconds = sum(run_seconds(manifest.entry(s.id)) for s in earlier)
        self.cost = sum(s.cost for s in earlier) if self.seconds else 0.0
        self.started_cost = self.here_seconds = self.here_cost = 0.0

    def started(self, spec):
        """``spec`` has started (or was found done): its cost leaves the ETA."""
        self.started_cost += self.costs[spec.id]

    def trained(self, spec, seconds):
        """``spec`` trained here in ``seconds``."""
        self.here_seconds, self.here_cost = self.here_seconds + seconds, self.here_cost + spec.cost

    def minutes(self):
        """Minutes until the runs not yet started have finished."""
        rate = (self.here_seconds / self.here_cost if self.here_cost else self.seconds / self.cost if self.cost
                else 45.0)
        return (self.total - self.started_cost) * rate / self.parallel / 60


def _count_killed(progress, rid, seconds):
    """Record one killed training process of ``rid`` and the ``seconds`` it ran (lost up to its checkpoint)."""
    entry = progress.entry(rid)
    progress.record(rid, killed_processes=entry.get("killed_processes", 0) + 1,
                    killed_process_seconds=entry.get("killed_process_seconds", 0.0) + seconds)


def _execute(the_plan, runs_dir, out, manifest, dry_run, failed, collected, jobs=1, threads=None):
    """:func:`execute`'s scheduler: in plan order, start every run whose sources have finished while fewer than
    ``jobs`` run; appends the ids that fail to ``failed``."""
    specs = list(the_plan.runs.values())
    states = run_states(specs, runs_dir, out, manifest)
    eta = Eta(specs, manifest, jobs, out, states)
    worker = Worker(the_plan, runs_dir, out, manifest, states, threads)
    finished, pending, running = set(), list(specs), {}
    _stop.clear()

    def announce(spec, state):
        flight = f"; in flight: {', '.join(s.id for s in running.values())}" if running else ""
        print(f"[{eta.position[spec.id]}/{len(specs)}] {spec.id}: {state}  (ETA of the rest ≈ {eta.minutes():.0f} "
              f"min{flight})", flush=True)
        eta.started(spec)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            while pending or running:
                for spec in list(pending):
                    if len(running) >= jobs:
                        break
                    if any(dep in failed for dep in spec.deps):
                        pending.remove(spec)
                        announce(spec, states[spec.id])
                        print(f"    skipped: it starts from a failed run ({', '.join(spec.deps)})")
                        failed.append(spec.id)
                    elif all(dep in finished for dep in spec.deps):
                        pending.remove(spec)
                        announce(spec, states[spec.id])
                        if states[spec.id] == "collected" or dry_run:
                            finished.add(spec.id)
                        else:
                            running[pool.submit(worker.run, spec)] = spec
                if not running:
                    continue
                for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                    spec = running.pop(future)
                    ok, trained = future.result()
                    if not ok:
                        failed.append(spec.id)
                        continue
                    collect(spec, runs_dir, out, manifest, *worker.commands(spec))
                    finished.add(spec.id)
                    if trained is not None:
                        eta.trained(spec, trained)
                    if collected is not None:
                        collected()
        except BaseException:  # Ctrl-C, SIGTERM: the runs in flight stop and resume next time
            _kill_children()
            raise


def _evaluate(spec, base, log, progress, evals, threads=None):
    """Run the evaluations of ``spec`` (each resumes what an earlier one wrote) and archive its network (its run in
    ``base``); returns whether all succeeded."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0, spent = time.time(), progress.entry(spec.id).get("eval_seconds", 0.0)
    try:
        for name, cmd in evals.items():
            result = call(cmd, log, threads=threads)
            if result.returncode not in (0, 3):  # 3 = order-check warning, reported in the report itself
                print(f"    evaluation {name} failed (exit {result.returncode}); see {log}")
                return False
        if not RunDir(base / spec.id).archive.is_file():
            result = call([sys.executable, "-m", "training.archive", str(base / spec.id), "--verbose", "2"], log,
                           threads=threads)
            if result.returncode != 0:
                print(f"    archiving the network failed (exit {result.returncode}); see {log}")
                return False
    finally:
        progress.record(spec.id, eval_seconds=spent + time.time() - t0)
    return True


def _display(cmd):
    """A command line as a user would type it from the repository root."""
    return " ".join(["python"] + [str(c).replace(str(ROOT) + os.sep, "") for c in cmd[1:]])


def collect(spec, runs_dir, out, manifest, train_cmd, evals):
    """Copy the run's metrics, evaluations, archived network and the epoch snapshots that planned lottery tickets
    rewind to into ``out/runs/ID`` (a run re-evaluated there has them already) and record the run in the
    manifest."""
    run_dir, dest = runs_dir / spec.id, out / "runs" / spec.id
    copied = RunDir(run_dir).is_complete()
    if copied:
        dest.mkdir(parents=True, exist_ok=True)
        run = RunDir(run_dir)
        for path in [run.metrics, run.archive, *run_dir.glob("eval*.json"), *run_dir.glob("eval*.md")]:
            if path.is_file():  # eval.json, and any extra report such as eval_aa.json (training.evaluate --name)
                shutil.copyfile(path, dest / path.name)
        for epoch in spec.snapshots:  # a new machine rewinds from these rather than training the source again
            kept = RunDir(dest).snapshot(epoch)
            if run.snapshot(epoch).is_file():  # else the ticket's own check names the missing epoch
                kept.parent.mkdir(exist_ok=True)
                shutil.copyfile(run.snapshot(epoch), kept)
    metrics = json.loads(RunDir(dest).metrics.read_text())
    entry = manifest.data["runs"].get(spec.id, {})
    manifest.record(spec.id, status="finished",
                    command=_display(train_cmd) if copied else entry.get("command", _display(train_cmd)),
                    evaluate=" && ".join(_display(cmd) for cmd in evals.values()),
                    commit=entry.get("commit") or git_commit(out), train_seconds=metrics["train_seconds"],
                    wall_seconds=metrics["wall_seconds"])


