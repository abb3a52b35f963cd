"""The run directory: atomic writes and the completion marker that tells a finished run from a killed one."""

import json

from bcs_run.rundir import RunDir, atomic_write


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_run_is_finished_by_its_marker_not_by_the_presence_of_metrics(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_complete()
    (tmp_path / RunDir.MODEL).write_bytes(b"model")
    run.write_json(RunDir.METRICS, {"completion_marker": True})  # killed after metrics.json, before the marker
    assert not run.is_complete()
    run.mark_complete()
    assert run.is_complete() and run.network() == run.model


def test_runs_made_before_the_marker_count_as_finished_when_their_metrics_are_readable(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / RunDir.MODEL).write_bytes(b"model")
    (tmp_path / RunDir.METRICS).write_text('{"test_clean_acc": 0.9')  # half-written by an old, killed process
    assert not run.is_complete()
    (tmp_path / RunDir.METRICS).write_text(json.dumps({"test_clean_acc": 0.9}))
    assert run.is_complete()
