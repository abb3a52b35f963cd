"""``training.reproduce --executor ray``: every run of a plan as a Ray task, on a local Ray cluster or on an
existing one (``--address``).

A task is the same :class:`training.jobs.Worker` sequence of processes as the local executor (training,
evaluations, archive), started on whichever node Ray picks; its sources come in through the task graph (a run's
task takes its sources' results as arguments, so Ray starts it after them). The tasks write into ``--runs-dir``
and read collected sources from ``--out``, so both must be on a filesystem that every node sees (checked at the
start). A task records its times in a progress file beside its run directory (``runs-dir/ID.progress.json``, as
the manifest would, heartbeat included); the driver alone merges these into ``manifest.json``, collects each
finished run and writes the tables. A task whose worker dies is retried by Ray and resumes from its last
checkpoint; the time its killed process ran is recorded as ``killed_process_seconds``."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import uuid

from bcs_run import cli
from bcs_run.rundir import atomic_write
from training import jobs

INSTALL_HINT = "pip install 'bcs-tf[ray]' (or pip install ray)"


def _ray():
    try:
        import ray
    except ImportError:
        raise cli.FlagError(f"--executor ray needs Ray: {INSTALL_HINT}") from None
    return ray


class TaskProgress:
    """A task's run entry, kept in ``runs_dir/ID.progress.json`` (what a killed worker's next attempt and the
    driver read) instead of the manifest, which only the driver writes."""

    def __init__(self, runs_dir, rid, entry):
        self.path = pathlib.Path(runs_dir) / f"{rid}.progress.json"
        saved = read_progress(self.path)
        self.data = saved if saved is not None else dict(entry)

    def entry(self, rid):
        """The task's run entry (the manifest's interface; ``rid`` is this task's)."""
        return self.data

    def record(self, rid, **entry):
        """Update the entry and save it (as :meth:`training.jobs.Manifest.record` does the manifest's)."""
        jobs.update_entry(self.data, entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.data))


def read_progress(path):
    """A progress file's entry, or None when there is none (or it is being replaced)."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


def _run_task(worker, spec, entry, *sources):
    """One run as a Ray task; ``sources``: the results of the tasks of its sources (Ray passes them in once they
    have finished). Returns ``(ok, training seconds or None)``."""
    if not all(ok for ok, _ in sources):
        return False, None
    worker.progress = TaskProgress(worker.runs_dir, spec.id, entry)
    return worker.run(spec)


def _sees(paths, token):
    """On one node: the ``paths`` whose check file (holding ``token``) this node cannot read."""
    missing = []
    for path in paths:
        try:
            if (pathlib.Path(path) / f".ray-check-{token}").read_text() != token:
                missing.append(path)
        except OSError:
            missing.append(path)
    return os.uname().nodename, missing


def check_shared(ray, paths):
    """Refuse to start unless every alive node of the cluster can read ``paths`` (the runs and results
    directories) and import this project."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    checks = [pathlib.Path(p) / f".ray-check-{token}" for p in paths]
    for check in checks:
        atomic_write(check, token)
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        sees = ray.remote(_sees)
        refs = [sees.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote([str(p) for p in paths], token) for node in nodes]
        for node, ref in zip(nodes, refs):
            where = node.get("NodeManagerAddress", node["NodeID"])
            try:
                _, missing = ray.get(ref, timeout=300)
            except Exception as exc:  # e.g. the node cannot import training.ray_jobs
                raise cli.FlagError(f"--executor ray: node {where} cannot run this project's tasks "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); install bcs-tf at "
                                    "the same commit on every node") from None
            if missing:
                raise cli.FlagError(f"--out/--runs-dir: node {where} cannot see {', '.join(missing)}; put both on a "
                                    "filesystem that every node mounts at the same path (e.g. NFS)")
    finally:
        for check in checks:
            check.unlink(missing_ok=True)


def start(address=None):
    """Connect to the Ray cluster at ``address``, or start a local one on this machine (all its cores)."""
    ray = _ray()
    env = {"env_vars": {"PYTHONPATH": str(jobs.ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}}
    kwargs = {"address": address} if address else {"num_cpus": os.cpu_count(), "include_dashboard": False}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(runtime_env=env, log_to_driver=False, logging_level="ERROR", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise cli.FlagError(f"--address: cannot connect to the Ray cluster at {address} "
                            f"({str(exc).splitlines()[0][:200]})") from None
    finally:  # Ray installs its own; ours stop the tasks, record their runs as stopped and end the cluster
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return ray


def execute(the_plan, runs_dir, out, manifest, collected=None, threads=1, address=None):
    """Run every planned run that is not done as a Ray task (``threads`` CPUs each, and a GPU each when the
    cluster has GPUs), calling ``collected()`` after each run whose results reach ``out``; returns ``(ids that
    failed, stopped)`` as :func:`training.jobs.execute` does."""
    ray = start(address)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        check_shared(ray, [runs_dir.resolve(), out.resolve()])
        return _execute(ray, the_plan, runs_dir, out, manifest, collected, threads)
    finally:
        ray.shutdown()


def _execute(ray, the_plan, runs_dir, out, manifest, collected, threads):
    specs = list(the_plan.runs.values())

    def merge(spec, remove=False):
        path = runs_dir / f"{spec.id}.progress.json"
        entry = read_progress(path)
        if entry is not None and entry != manifest.entry(spec.id):  # keys the task removed go too
            manifest.record(spec.id, **{key: entry.get(key) for key in {**manifest.entry(spec.id), **entry}})
        if remove:  # its task has ended: the manifest holds the entry from here on
            path.unlink(missing_ok=True)

    for spec in specs:  # what the tasks of a driver killed outright last wrote
        merge(spec, remove=True)
    states = jobs.run_states(specs, runs_dir, out, manifest)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    task = ray.remote(_run_task).options(num_cpus=threads, num_gpus=gpus, max_retries=jobs.RETRIES,
                                         retry_exceptions=False)
    worker = jobs.Worker(the_plan, runs_dir, out, None, states, threads)
    eta = jobs.Eta(specs, manifest, max(1, int(ray.cluster_resources().get("CPU", 1) // threads)), out, states)
    refs, pending, failed = {}, {}, []
    for spec in specs:  # in the plan's order of value: Ray starts ready tasks in the order they came
        if states[spec.id] == "collected":
            refs[spec.id] = ray.put((True, None))
            eta.started(spec)
            continue
        refs[spec.id] = task.remote(worker, spec, manifest.entry(spec.id), *[refs[d] for d in spec.deps])
        pending[refs[spec.id]] = spec
    n = len(specs)
    print(f"{len(pending)} Ray tasks submitted ({threads} CPU{'s' if threads > 1 else ''}"
          f"{' and 1 GPU' if gpus else ''} each); {n - len(pending)} runs already collected", flush=True)

    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=jobs.HEARTBEAT_SECONDS)
            for spec in pending.values():  # the tasks' heartbeats: a killed driver still leaves their times
                merge(spec)
            for ref in done:
                spec = pending.pop(ref)
                try:
                    ok, trained = ray.get(ref)
                except ray.exceptions.RayError as exc:  # its worker died more often than it is retried
                    print(f"    {spec.id}: the Ray task failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})", flush=True)
                    ok, trained = False, None
                merge(spec, remove=True)
                eta.started(spec)
                if not ok:
                    failed.append(spec.id)
                    state = "skipped (a source failed)" if any(d in failed for d in spec.deps) else "failed"
                    print(f"[{eta.position[spec.id]}/{n}] {spec.id}: {state}", flush=True)
                    continue
                jobs.collect(spec, runs_dir, out, manifest, *worker.commands(spec))
                if trained is not None:
                    eta.trained(spec, trained)
                print(f"[{eta.position[spec.id]}/{n}] {spec.id}: finished  (ETA of the rest ≈ {eta.minutes():.0f} "
                      "min)", flush=True)
                if collected is not None:
                    collected()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        # a force-cancel is asynchronous: a worker not yet killed could write its progress file after it was merged
        ray.wait(list(pending), num_returns=len(pending), timeout=60)
        for spec in pending.values():
            merge(spec, remove=True)
            if manifest.entry(spec.id).get("status") == "running":  # stopped on purpose, not killed
                manifest.record(spec.id, status="stopped", process_started_at=None)
        print("stopped: the same command goes on from here (a stopped run resumes from its last checkpoint)")
        return failed, True
    return failed, False
