"""``python -m training.reproduce --table {bcs,hydra,sparsity,all}``: every run a table of the two seed papers
needs, in dependency order, each trained, evaluated and collected into tables and figures.

Runs live in ``--runs-dir`` (default ``runs/reproduce/DATASET-PRESET``): a finished run is skipped, a stopped
one resumed, and the evaluation continues where it stopped. ``--out`` receives ``table_*.md``, the figures,
each run's ``metrics.json`` / ``eval.json`` and ``manifest.json`` (every run's command, commit and wall time);
the tables are made from it alone, so a reproduction can go on on another machine from a committed ``--out``
(runs collected there are not trained again unless a run still to train starts from them). A results
directory made with other settings (dataset or preset) is refused.
"""

from __future__ import annotations

import dataclasses
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
from bcs_run.config import DATASET_NAMES
from bcs_run.rundir import RunDir, atomic_write

ROOT = pathlib.Path(__file__).resolve().parent.parent
TABLES = ("bcs", "hydra", "sparsity")
BCS_OBJECTIVES = ("natural", "at", "mat", "trades", "mart")  # the rows of the BCS paper's tables
SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)
SPARSITY_METHODS = ("fixed", "lottery", "lottery_rw0", "lottery_reinit", "bcs", "hydra")
FULL_ATTACKS = ("clean", "fgsm", "pgd50", "pgd100", "autoattack", "bb")
AA_ATTACKS = ("clean", "autoattack")  # eval_aa.json: AutoAttack (and the clean accuracy it starts from)
# relative cost of one epoch (AT PGD-10 on small_cnn = 1), for the ETA before the first run has finished
OBJECTIVE_COST = {"natural": 0.25, "at": 1.0, "mat": 0.6, "trades": 1.4, "mart": 1.05}
RUN_OVERHEAD = 0.6  # start-up, the final test PGD-20 on 10,000 images and the evaluation, in the same units
AA_COST = 5.0  # AutoAttack on 1,000 test images of small_cnn, in the same units
# how often a training run's time so far is written to the manifest (what a SIGKILL can lose); tests shorten it
HEARTBEAT_SECONDS = float(os.environ.get("BCS_TF_HEARTBEAT_SECONDS", 30))

PRESETS = {
    # 3 seeds of every robust cell, compute-matched controls, PGD-50 on all 10,000 test images and AutoAttack on
    # 1,000 for the 99% models and the 90% BCS / Fixed / HYDRA ones: 234 runs, ≈ 25 h of 2-core machine time
    "quick": {"epochs": 5, "val_split": 1000, "eval_examples": 10000, "bcs_objectives": ("natural", "at", "trades"),
              "sparsity_epochs": 3, "prune_rounds": 2, "round_epochs": 1, "eps": 0.1, "seeds": 3, "matched": True,
              "aa_examples": 1000},
    # a few seconds per run on the synthetic task: for tests of the orchestration, not for results
    "smoke": {"epochs": 2, "val_split": 128, "eval_examples": 64, "bcs_objectives": ("at",), "sparsity_epochs": 1,
              "prune_rounds": 2, "round_epochs": 1, "eps": 0.1},
    # the one-seed 20-epoch table of results/fashion_mnist-full (its settings stay as they were made)
    "full": {"epochs": 20, "val_split": 5000, "eval_examples": 1000, "bcs_objectives": BCS_OBJECTIVES,
             "sparsity_epochs": 20, "prune_rounds": 3, "round_epochs": 10, "eps": 0.1},
}


@dataclasses.dataclass
class RunSpec:
    """One training run: its id (its directory under the runs dir), flags, dependencies and evaluation
    (``attacks`` on the preset's ``eval_examples`` into eval.json; ``aa``: AutoAttack on ``aa_examples`` into
    eval_aa.json)."""

    id: str
    flags: dict
    deps: tuple = ()
    attacks: tuple = ("clean", "pgd50")
    aa: bool = False

    @property
    def needs_source_run(self):
        """Whether ``--from`` must be a whole run directory: a rewound lottery ticket reads its epoch snapshots;
        every other method reads only the source's finished network, which its archive holds."""
        return self.flags["method"] == "lottery" and not self.flags.get("reinit")

    @property
    def total_epochs(self):
        """Epochs of this run's own phases (score learning and intermediate pruning rounds included)."""
        epochs = self.flags["epochs"]
        if self.flags["method"] == "hydra":  # training.run's default score phase when the flag is not given
            epochs += self.flags.get("score_epochs") or max(1, round(0.2 * self.flags["epochs"]))
        if self.flags["method"] == "lottery" and not self.flags.get("reinit"):
            epochs += (self.flags["prune_rounds"] - 1) * self.flags["round_epochs"]
        return epochs

    @property
    def cost(self):
        """Estimated cost in AT-epoch units (for the ETA)."""
        width = {"small_cnn_x2": 3.0, "small_cnn_x4": 9.0}.get(self.flags.get("model"), 1.0)
        return ((self.total_epochs * OBJECTIVE_COST[self.flags["objective"]] + RUN_OVERHEAD) * width
                + (AA_COST * width if self.aa else 0.0))


def _conn(sparsity):
    return round(1.0 - sparsity, 6)


AA_SCOPES = ("preset", "99", "none")
AA_DEFAULT_EXAMPLES = 1000


def _wants_aa(objective, method, connectivity, scope):
    """AutoAttack for every robust 99% model and, in the ``preset`` scope, the 90% BCS, Fixed and HYDRA ones."""
    if scope == "none" or objective == "natural" or method == "dense":
        return False
    return connectivity <= 0.01 or (scope == "preset" and method in ("bcs", "fixed", "hydra"))


class Plan:
    """The runs the requested tables need, deduplicated, in dependency order and, across tables, in the order of
    value (see :func:`plan`)."""

    def __init__(self, dataset, preset, seeds, full_eval, aa="preset"):
        self.dataset, self.p, self.full_eval = dataset, dict(PRESETS[preset]), full_eval
        if aa == "99":  # e.g. the full preset's 99% models, which its own settings do not attack with AutoAttack
            self.p.setdefault("aa_examples", AA_DEFAULT_EXAMPLES)
        self.aa = "none" if not self.p.get("aa_examples") else aa
        self.seeds = seeds or self.p.get("seeds", 1)
        self.runs = {}

    def add(self, spec):
        if spec.id in self.runs:
            old = self.runs[spec.id]
            old.attacks = tuple(dict.fromkeys(old.attacks + spec.attacks))
            old.aa = old.aa or spec.aa
            return old
        for dep in spec.deps:
            if dep not in self.runs:
                raise AssertionError(f"{spec.id} depends on {dep}, which is not planned before it")
        if self.full_eval:
            spec.attacks = tuple(dict.fromkeys(spec.attacks + FULL_ATTACKS))
        self.runs[spec.id] = spec
        return spec

    def run(self, objective, method, connectivity, seed, epochs=None, source=None, attacks=("clean", "pgd50"),
            tag="", **extra):
        """Plan one run (and return its id)."""
        name = method if connectivity >= 1 else f"{method}_c{connectivity:g}"
        rid = f"{objective}/{name}{tag}_s{seed}"
        flags = {"objective": objective, "method": method, "connectivity": connectivity, "dataset": self.dataset,
                 "epochs": epochs or self.p["epochs"], "val_split": self.p["val_split"], "eps": self.p["eps"],
                 "seed": seed, **extra}
        if objective == "natural":  # no robustness to select by: the best epoch is the best clean one
            flags["select_by"] = "clean"
        if source:
            flags["from"] = source
        aa = _wants_aa(objective, method, connectivity, self.aa)
        return self.add(RunSpec(rid, flags, (source,) if source else (), tuple(attacks), aa)).id

    @property
    def matched_epochs(self):
        """Total epochs of Fixed (dense pre-training + fine-tuning): what the compute-matched controls train."""
        return 2 * self.p["epochs"]

    def _bcs_cells(self, objective, seed, connectivities):
        dense = self.run(objective, "dense", 1.0, seed)
        for c in connectivities:
            self.run(objective, "fixed", c, seed, source=dense)
            self.run(objective, "random", c, seed)
            self.run(objective, "bcs", c, seed)
            if self.p.get("matched") and objective != "natural":
                e = self.matched_epochs
                self.run(objective, "bcs", c, seed, epochs=e, tag=f"_e{e}")
                self.run(objective, "random", c, seed, epochs=e, tag=f"_e{e}")
        return dense

    def _robust_objectives(self):
        return [o for o in self.p["bcs_objectives"] if o != "natural"]

    def bcs_99(self):
        """The 99% columns of the robust rows (with their compute-matched controls), seed by seed."""
        for seed in range(self.seeds):
            for objective in self._robust_objectives():
                self._bcs_cells(objective, seed, (0.01,))

    def bcs_rest(self):
        """The 90% columns, the long dense control and the natural-training row."""
        for seed in range(self.seeds):
            for objective in self.p["bcs_objectives"]:
                self._bcs_cells(objective, seed, (0.1, 0.01))
                if self.p.get("matched") and objective != "natural":
                    self.run(objective, "dense", 1.0, seed, epochs=self.matched_epochs, tag=f"_e{self.matched_epochs}")

    def hydra_table(self):
        attacks = ("clean", "fgsm", "pgd50", "pgd100")
        for seed in range(self.seeds):
            for objective in ("at", "trades"):
                dense = self.run(objective, "dense", 1.0, seed)
                for c in (0.01, 0.1):
                    self.run(objective, "hydra", c, seed, source=dense, attacks=attacks)
                    self.run(objective, "bcs", c, seed, attacks=attacks)
                    if self.p.get("matched"):
                        e = self.matched_epochs
                        self.run(objective, "bcs", c, seed, epochs=e, tag=f"_e{e}", attacks=attacks)

    def sparsity_table(self):
        p = self.p
        e = p["sparsity_epochs"]
        lottery = {"prune_rounds": p["prune_rounds"], "round_epochs": p["round_epochs"]}
        for seed in range(self.seeds):
            dense = self.run("at", "dense", 1.0, seed, epochs=e, tag=f"_e{e}")
            if p.get("matched"):  # Wang et al.'s "natural pruning": the mask and weights of a naturally trained
                natural = self.run("natural", "dense", 1.0, seed, epochs=e, tag=f"_e{e}")  # network, then AT
                for c in (0.1, 0.01):
                    self.run("at", "fixed", c, seed, epochs=e, source=natural, tag=f"_natsrc_e{e}")
            # the extremes first, so a stopped reproduction has the most telling cells
            for s in sorted(SPARSITIES[1:], key=lambda s: (s not in (0.99, 0.9), -s)):
                c = _conn(s)
                self.run("at", "fixed", c, seed, epochs=e, source=dense, tag=f"_e{e}")
                ticket = self.run("at", "lottery", c, seed, epochs=e, source=dense, tag=f"_e{e}", **lottery)
                self.run("at", "lottery", c, seed, epochs=e, source=ticket, tag=f"_reinit_e{e}", reinit=True)
                if p.get("matched"):
                    self.run("at", "lottery", c, seed, epochs=e, source=dense, tag=f"_rw0_e{e}", rewind_epoch=0,
                             **lottery)
                self.run("at", "bcs", c, seed, epochs=e, tag=f"_e{e}")
                self.run("at", "hydra", c, seed, epochs=e, source=dense, tag=f"_e{e}")
                if p.get("matched"):  # BCS for as many epochs as Fixed spends (dense pre-training included)
                    self.run("at", "bcs", c, seed, epochs=2 * e, tag=f"_e{2 * e}")
            if p.get("matched"):
                self.run("at", "dense", 1.0, seed, epochs=2 * e, tag=f"_e{2 * e}")
            small = self.run("at", "bcs", 0.1, seed, epochs=e, tag=f"_e{e}")
            self.run("at", "iwi", 1.0, seed, epochs=e, source=small, tag=f"_x2_e{e}", model="small_cnn_x2")
            self.run("at", "dense", 1.0, seed, epochs=e, tag=f"_x2_e{e}", model="small_cnn_x2")
            if p.get("matched"):  # plain AT of the large network for IWI's total (small network + IWI)
                self.run("at", "dense", 1.0, seed, epochs=2 * e, tag=f"_x2_e{2 * e}", model="small_cnn_x2")


def plan(tables, dataset, preset, seeds=None, full_eval=False, aa="preset"):
    """The :class:`Plan` of ``tables`` (``seeds`` None: the preset's). Across tables the runs come in the order of
    value: the 99% columns of the robust BCS rows with their controls, then HYDRA, then the rest of the BCS
    table, then the sparsity table and IWI."""
    p = Plan(dataset, preset, seeds, full_eval, aa)
    for table, part in (("bcs", p.bcs_99), ("hydra", p.hydra_table), ("bcs", p.bcs_rest),
                        ("sparsity", p.sparsity_table)):
        if table in tables:
            part()
    return p


# ---- execution ---------------------------------------------------------------------------------------------


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


def train_command(spec, runs_dir, archived=()):
    """The ``python -m training.run`` command line of ``spec``: ``--from`` is the source's directory in
    ``runs_dir``, or its archived run in ``out/runs`` when it is in ``archived`` (a dict id -> directory)."""
    cmd = [sys.executable, "-m", "training.run"]
    for key, value in spec.flags.items():
        flag = "--" + key.replace("_", "-")
        if key == "from":
            value = archived[value] if value in archived else runs_dir / value
        if value is True:
            cmd.append(flag)
        elif value is not False and value is not None:
            cmd += [flag, str(value)]
    return cmd + ["--out", str(runs_dir / spec.id), "--verbose", "2"]


def eval_commands(spec, runs_dir, p):
    """``{report name: python -m training.evaluate command line}`` of ``spec``: eval.json with its attacks on the
    preset's ``eval_examples``, and eval_aa.json with AutoAttack on ``aa_examples`` when the spec asks for it."""
    def command(name, attacks, n):
        return [sys.executable, "-m", "training.evaluate", str(runs_dir / spec.id), "--attacks", ",".join(attacks),
                "--n-examples", str(n), "--name", name, "--resume", "--verbose", "2", "--no-report"]

    commands = {"eval": command("eval", spec.attacks, p["eval_examples"])}
    if spec.aa:
        commands["eval_aa"] = command("eval_aa", AA_ATTACKS, p["aa_examples"])
    return commands


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
    failed, stopped = execute(the_plan, runs_dir, out, manifest,
                              collected=lambda: _summarise(tables, the_plan, out, manifest))
    written = _summarise(tables, the_plan, out, manifest)
    manifest.data.setdefault("invocations", []).append(
        {"tables": list(tables), "seeds": args.seeds, "full_eval": args.full_eval, "aa": args.aa,
         "commit": _commit(out),
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
