"""Training that survives faults and bad input: divergence, kills at any moment, unwritable places, bad files."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import bcs_tf.robustness.art  # noqa: F401  (ART closes the logging streams that exist when it is imported)
import training.fitting as fitting
from bcs_tf.checkpoint import check_before_save, has_checkpoint, load_checkpoint, read_state, save_checkpoint
from bcs_tf.errors import CheckpointError, DivergenceError
from bcs_tf.objectives import make_objective
from bcs_tf.trainer import RobustTrainer
from tests.conftest import tiny_sparse_net
from training.run import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from conftest import TINY_RUN  # noqa: E402

FAST = TINY_RUN + ["--batch-size", "128", "--no-report"]  # 7 steps per epoch


def _files(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "logs" not in p.parts}


def _poison(monkeypatch, times=None):
    """Make every training batch (or those of the first ``times`` pipelines built) NaN."""
    original, built = fitting.train_pipeline, []

    def poisoned(*args, **kwargs):
        ds = original(*args, **kwargs)
        built.append(1)
        if times is not None and len(built) > times:
            return ds
        return ds.map(lambda x, y: (x * float("nan"), y))

    monkeypatch.setattr(fitting, "train_pipeline", poisoned)


def test_nan_stops_at_the_step_and_leaves_every_file_untouched(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(FAST + ["--epochs", "1", "--out", str(run)]) == 0
    before = _files(run)
    _poison(monkeypatch)
    assert main(FAST + ["--epochs", "2", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training diverged at step 8: the loss became NaN") and "\n" not in err, err
    after = _files(run)
    after.pop(pathlib.Path("config.json")), before.pop(pathlib.Path("config.json"))  # records the new --epochs
    assert after == before  # checkpoint, best weights, model.keras, metrics.json: all as they were


def test_nan_restore_rolls_back_halves_the_learning_rate_and_finishes_on_budget(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _poison(monkeypatch, times=1)  # the batches are bad once; after the roll-back they are fine
    assert main(FAST + ["--epochs", "1", "--out", str(run), "--on-nan", "restore"]) == 0
    assert "rolling back to the last checkpoint, learning rate ×0.5" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["lr_scale"] for r in metrics["divergence_restores"]] == [0.5]
    assert metrics["connectivity"]["active"] == metrics["allocation"]["budgets"][0]


def test_nan_restore_gives_up_after_three_attempts(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch)
    assert main(FAST + ["--epochs", "1", "--out", str(tmp_path / "run"), "--on-nan", "restore"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("rolling back") == 3 and "after 3 restore(s)" in captured.err
    assert not (tmp_path / "run" / "model.keras").exists()


def _trainer():
    net = tiny_sparse_net(0.3)
    from bcs_tf.connectivity import allocate_budget
    from bcs_tf.layers import sparse_layers

    layers = sparse_layers(net)
    allocation = allocate_budget([layer.kernel_size_total for layer in layers], 0.3, "layer")
    for layer, count in zip(layers, allocation.counts):
        layer.reset_connectivity(count, seed=0)
    trainer = RobustTrainer(net, make_objective("natural"), allocation=allocation)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    trainer.prepare()
    return trainer, layers


def test_a_network_off_its_budget_is_never_saved(tmp_path):
    trainer, layers = _trainer()
    check_before_save(trainer, "ok")  # on budget: no complaint
    theta = layers[0].theta
    flat = np.asarray(theta.numpy()).reshape(-1)
    flat[np.flatnonzero(flat > 0)[0]] = 0.0  # one connection lost outside the sampler
    theta.assign(flat.reshape(theta.shape))
    with pytest.raises(DivergenceError, match="budget"):
        check_before_save(trainer, "epoch 3")


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    trainer, layers = _trainer()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(trainer, ckpt, {"epoch": 1, "best": 0.5, "monitor": "m", "history": []})
    saved = [v.numpy().copy() for v in trainer.net.weights]
    trainer.optimizer.iterations.assign(5)
    for v in trainer.net.trainable_weights:
        v.assign(v + 1.0)
    real_replace = os.replace

    def dies_before_commit(src, dst):
        if pathlib.Path(dst).name == "state.json":
            raise KeyboardInterrupt  # the process dies after the new weights, before the commit point
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_before_commit)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(trainer, ckpt, {"epoch": 2, "best": 0.6, "monitor": "m", "history": []})
    monkeypatch.undo()
    assert read_state(ckpt)["epoch"] == 1
    load_checkpoint(trainer, ckpt)
    for a, b in zip(saved, trainer.net.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_only_the_newest_checkpoints_are_kept_and_a_corrupt_state_falls_back(tmp_path):
    trainer, _ = _trainer()
    ckpt = tmp_path / "ckpt"
    for step in (1, 2, 3):
        trainer.optimizer.iterations.assign(step)
        save_checkpoint(trainer, ckpt, {"epoch": step, "best": 0.0, "monitor": "m", "history": []}, keep=2)
    assert sorted(p.name for p in ckpt.glob("ckpt-*.json")) == ["ckpt-000000002.json", "ckpt-000000003.json"]
    (ckpt / "state.json").write_text("{ truncated")
    assert has_checkpoint(ckpt) and read_state(ckpt)["epoch"] == 3  # the newest numbered checkpoint
    (ckpt / "state.json").write_text(json.dumps({"format": 99, "epoch": 1, "best": 0, "monitor": "m",
                                                 "history": [], "rng": {}}))
    (ckpt / "ckpt-000000003.json").unlink()
    assert read_state(ckpt)["epoch"] == 2
    for p in ckpt.glob("ckpt-*"):
        p.unlink()
    with pytest.raises(CheckpointError, match="newer bcs-tf"):
        read_state(ckpt)


def _final_weights(run):
    import bcs_tf  # noqa: F401

    return [w.numpy() for w in keras.models.load_model(run / "model.keras").weights]


def test_a_run_killed_with_sigkill_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    flags = FAST + ["--epochs", "3", "--checkpoint-every", "3", "--objective", "trades"]
    whole = tmp_path / "whole"
    assert main(flags + ["--out", str(whole)]) == 0
    split = tmp_path / "split"
    proc = subprocess.Popen([sys.executable, "-m", "training.run", *flags, "--out", str(split)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state, deadline = split / "checkpoint" / "state.json", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text()).get("step_in_epoch"):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = json.loads(state.read_text())
    assert saved.get("step_in_epoch") and not (split / "metrics.json").exists(), "killed too late"
    assert main(flags + ["--out", str(split), "--resume"]) == 0
    for a, b in zip(_final_weights(whole), _final_weights(split)):
        np.testing.assert_array_equal(a, b)  # bit-exact on CPU
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (whole, split))
    assert a["connectivity"] == b["connectivity"] and a["test_pgd2_acc"] == b["test_pgd2_acc"]
    assert b["connectivity"]["active"] == b["allocation"]["budgets"][0]


@pytest.mark.parametrize("flags,message", [
    (["--out", "/proc/bcs-tf-nope/run"], "/proc/bcs-tf-nope"),
    (["--eval-steps", "0"], "--eval-steps"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
])
def test_bad_places_and_zero_step_attacks_are_one_line_errors(flags, message, capsys):
    assert main(FAST + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


@pytest.mark.parametrize("x_shape,label,message", [((5, 8, 8, 1), 1, "images of shape"),
                                                   ((5, 28, 28, 1), 12, "labels in")])
def test_extra_data_of_the_wrong_shape_or_labels_is_refused_before_anything_is_written(tmp_path, capsys, x_shape,
                                                                                       label, message):
    pool = tmp_path / "pool.npz"
    np.savez(pool, x=np.zeros(x_shape, np.float32), y=np.full(x_shape[0], label))
    out = tmp_path / "run"
    assert main(FAST + ["--objective", "rst", "--extra-data", str(pool), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("name,message", [("pool.npy", "not an .npz (zip) file"), ("none.npz", "no such file")])
def test_extra_data_that_is_no_npz_is_one_line_error(tmp_path, capsys, name, message):
    np.save(tmp_path / "pool.npy", np.zeros((5, 28, 28, 1), np.float32))  # np.load gives a bare array for it
    out = tmp_path / "run"
    assert main(FAST + ["--objective", "rst", "--extra-data", str(tmp_path / name), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read extra data") and message in err and "\n" not in err
    assert not out.exists()


def test_evaluate_and_export_refuse_foreign_models_and_too_many_examples(tmp_path, capsys):
    from export.__main__ import main as export_main
    from training.evaluate import main as evaluate_main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(foreign / "model.keras")
    assert evaluate_main([str(foreign), "--attacks", "clean", "--no-report"]) == 2
    assert "config.json" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(FAST + ["--max-steps", "1", "--epochs", "1", "--out", str(run)]) == 0
    assert evaluate_main([str(run), "--attacks", "clean", "--n-examples", "100000", "--no-report"]) == 2
    assert "--n-examples" in capsys.readouterr().err
    assert export_main([str(run), "--format", "keras", "--n-examples", "100000"]) == 2
    assert "--n-examples" in capsys.readouterr().err
    import bcs_tf  # noqa: F401

    keras.models.load_model(run / "model.keras", safe_mode=True)  # no unsafe (lambda) layers in our files
    assert tf.executing_eagerly()


@pytest.mark.parametrize("where", ["weights", "json"])
def test_a_full_disk_at_save_time_is_one_line_and_leaves_the_run_loadable(tmp_path, monkeypatch, capsys, where):
    import errno
    import shutil

    import bcs_tf.checkpoint as checkpoint

    run = tmp_path / "run"
    assert main(FAST + ["--epochs", "1", "--out", str(run)]) == 0
    before = _files(run)
    if where == "weights":  # the disk reports no room for the next weights file
        usage = shutil.disk_usage(run)
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    else:  # a JSON write fails part-way with ENOSPC
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(checkpoint.pathlib.Path, "write_text", full)
    assert main(FAST + ["--epochs", "2", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on device while writing ") and "\n" not in err, err
    assert str(run / "checkpoint") in err
    after = _files(run)
    after.pop(pathlib.Path("config.json")), before.pop(pathlib.Path("config.json"))
    assert after == before and not [p for p in run.rglob("tmp-*")]
    assert has_checkpoint(run / "checkpoint") and read_state(run / "checkpoint")["epoch"] == 1
    keras.models.load_model(run / "model.keras")
    assert json.loads((run / "metrics.json").read_text())["steps"] > 0


def test_a_real_full_disk_stops_with_one_line_and_no_crash(tmp_path):
    """On a 700 KB tmpfs (root only) the first weights file does not fit: exit 2, one line, no segfault, no
    temporary file left (HDF5 used to crash the process after a failed write)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts")
    try:
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               "TF_CPP_MIN_LOG_LEVEL": "3"}
        result = subprocess.run([sys.executable, "-m", "training.run", *FAST, "--epochs", "1", "--max-steps", "2",
                                 "--out", str(mount / "run")], capture_output=True, text=True, env=env)
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith("error: no space left on device while writing "), \
            result.stderr[-2000:]
        assert not [p for p in (mount / "run").rglob("tmp-*")]
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.parametrize("command", ["evaluate", "report", "export"])
def test_a_full_disk_in_evaluate_report_or_export_is_one_line_and_keeps_what_was_there(tmp_path, monkeypatch,
                                                                                        capsys, command):
    import errno

    import bcs_run.rundir as rundir
    from export.__main__ import main as export_main
    from training.evaluate import main as evaluate_main
    from training.report import main as report_main

    run = tmp_path / "run"
    assert main(FAST + ["--epochs", "1", "--out", str(run)]) == 0
    assert evaluate_main([str(run), "--attacks", "clean", "--n-examples", "32", "--verbose", "0"]) == 0
    assert export_main([str(run), "--format", "keras", "--n-examples", "16", "--verbose", "0"]) == 0
    before = _files(run)

    def full(fd):  # every atomic write finds the disk full once its bytes are out
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", full)
    argv = {"evaluate": (evaluate_main, [str(run), "--attacks", "clean,fgsm", "--n-examples", "32", "--resume",
                                          "--verbose", "0"]),
            "report": (report_main, [str(run)]),
            "export": (export_main, [str(run), "--format", "keras", "--n-examples", "16", "--overwrite",
                                     "--verbose", "0"])}
    fn, args = argv[command]
    assert fn(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on device while writing ") and "\n" not in err, err
    assert _files(run) == before and not [p for p in run.rglob(".*.tmp")]  # nothing changed, no debris
