"""Shared fixtures: quiet TensorFlow, deterministic seeds, tiny models; the test tiers.

Every test is ``unit`` (the daily lane, ``pytest -m unit``), ``integration`` (it trains, evaluates or exports
through a command line, or starts a process) or ``slow`` (marked in its module: minutes-long end-to-end
checks). A test not marked by hand is ``integration`` when it uses a fixture that trains a run or calls a CLI
``main`` or a subprocess, else ``unit``.
"""

import inspect
import os
import re
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=UserWarning)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bcs_tf.layers import SparseConv2D, SparseDense  # noqa: E402
# ART's import closes the logging streams that exist: once, here, before any test's capture, so a test that runs
# ART's attacks alone (e.g. through training.evaluate with capsys) does not close pytest's own
import bcs_tf.robustness.art  # noqa: E402,F401


def tiny_sparse_net(connectivity=0.2, seed=0, input_shape=(8, 8, 1), num_classes=4):
    """A two-layer sparse network small enough for hundreds of steps in a test."""
    inputs = keras.Input(input_shape)
    x = SparseConv2D(4, 3, strides=2, connectivity=connectivity, seed=seed, name="c1")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    outputs = SparseDense(num_classes, connectivity=connectivity, seed=seed + 1, name="d1")(x)
    return keras.Model(inputs, outputs)


def rewiring_steps(trainer, x, y, steps, batch=16):
    """Train ``trainer`` on ``steps`` successive mini-batches of ``(x, y)``, cycling through them; yields
    ``(step, units that died in it)`` after each step, so a test can check the network between steps."""
    batches = len(x) // batch
    for step in range(steps):
        before = [np.asarray(layer.theta) > 0 for layer in trainer.sampler.layers]
        part = slice((step % batches) * batch, (step % batches + 1) * batch)
        trainer.train_on_batch(x[part], y[part])
        after = [np.asarray(layer.theta) > 0 for layer in trainer.sampler.layers]
        yield step, sum(int(np.sum(b & ~a)) for b, a in zip(before, after))


# the flags of a training run on the synthetic task that takes seconds (each test module adds its own)
TINY_RUN = ["--dataset", "synthetic", "--val-split", "128", "--attack-steps", "2", "--eval-steps", "2",
            "--verbose", "0"]

RUN_FIXTURES = {"sparse_run", "run_dir", "block_run", "dense_run", "small_sparse_run", "whole_and_killed"}
RUNS_A_PROGRAM = re.compile(r"\b\w*main\(|subprocess|Popen")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("integration") or \
                item.get_closest_marker("unit"):
            continue
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        heavy = RUN_FIXTURES & set(item.fixturenames) or RUNS_A_PROGRAM.search(source)
        item.add_marker(pytest.mark.integration if heavy else pytest.mark.unit)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


class Killed(Exception):
    """Raised by the training a test "kills" right after its first checkpoint."""


@pytest.fixture
def whole_and_killed(monkeypatch, tmp_path):
    """``run(main, flags) -> (whole, split)``: an uninterrupted run, and the same run killed after its first epoch.

    ``split`` holds what the killed process left behind (its first checkpoint), ready for ``--resume``.
    """
    import training.fitting as fitting

    class KilledAfterFirstEpoch(fitting.EpochCheckpoint):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)  # the checkpoint is written, then the process "dies"
            raise Killed

    def run(main, flags):
        whole, split = tmp_path / "whole", tmp_path / "split"
        assert main(flags + ["--out", str(whole)]) == 0
        monkeypatch.setattr(fitting, "EpochCheckpoint", KilledAfterFirstEpoch)
        with pytest.raises(Killed):
            main(flags + ["--out", str(split)])
        monkeypatch.undo()
        return whole, split

    return run
