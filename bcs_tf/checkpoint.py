"""Resumable training checkpoints: weights (θ, γ, BatchNorm, optimizer slots), RNG states and progress.

A checkpoint is a directory with ``weights.weights.h5`` (Keras' own format: network and optimizer
variables) and ``state.json`` (epoch, best validation score, seed-generator states). Both files are written
to temporary names and renamed, so a process killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import keras
import numpy as np

from bcs_tf.errors import CheckpointError

WEIGHTS = "weights.weights.h5"
STATE = "state.json"


def _seed_generators(trainer):
    return {"attack_seed": trainer.attack_seed, "sampler_seed": trainer.sampler_seed}


def save_checkpoint(trainer, directory, state):
    """Save ``trainer`` (network + optimizer + RNG) and the JSON-serialisable ``state`` dict atomically."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = directory / ("tmp-" + WEIGHTS)
    trainer.save_weights(tmp_weights)
    full_state = dict(state)
    full_state["rng"] = {k: np.asarray(g.state.numpy()).tolist() for k, g in _seed_generators(trainer).items()}
    tmp_state = directory / ("tmp-" + STATE)
    tmp_state.write_text(json.dumps(full_state, indent=1))
    os.replace(tmp_weights, directory / WEIGHTS)
    os.replace(tmp_state, directory / STATE)


def has_checkpoint(directory):
    """Whether ``directory`` holds a complete checkpoint."""
    directory = pathlib.Path(directory)
    return (directory / WEIGHTS).is_file() and (directory / STATE).is_file()


def load_checkpoint(trainer, directory):
    """Restore ``trainer`` from ``directory``; returns the saved state dict. Raises CheckpointError."""
    directory = pathlib.Path(directory)
    if not has_checkpoint(directory):
        raise CheckpointError(f"no checkpoint in {directory} (expected {WEIGHTS} and {STATE})")
    try:
        state = json.loads((directory / STATE).read_text())
        rng = state["rng"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"corrupt checkpoint state {directory / STATE}: {exc}") from None
    try:
        trainer.load_weights(directory / WEIGHTS)
    except Exception as exc:  # h5py/Keras raise OSError, ValueError, KeyError... for bad files
        raise CheckpointError(
            f"corrupt or incompatible checkpoint {directory / WEIGHTS}: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    for key, generator in _seed_generators(trainer).items():
        generator.state.assign(np.asarray(rng[key], dtype=generator.state.dtype))
    return state


class EpochCheckpoint(keras.callbacks.Callback):
    """Keras callback: checkpoint at every epoch end and keep the best network weights.

    The best epoch is chosen by ``monitor`` (default ``val_robust_acc``, higher is better) on the
    validation split; its network weights go to ``best_path`` (not kept when ``best_path`` is None).
    """

    def __init__(self, directory, best_path, monitor="val_robust_acc", resumed_state=None):
        super().__init__()
        state = resumed_state or {}
        self.directory = pathlib.Path(directory)
        self.best_path = pathlib.Path(best_path) if best_path is not None else None
        self.monitor = monitor
        self.best = state.get("best", -np.inf)
        self.best_epoch = state.get("best_epoch")
        self.history = list(state.get("history", []))
        self.seconds_before = state.get("train_seconds", 0.0)
        self._t0 = time.time()

    @property
    def train_seconds(self):
        """Training wall time so far, including the runs this one resumed."""
        return self.seconds_before + time.time() - self._t0

    def on_train_begin(self, logs=None):
        self._t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.history.append({"epoch": epoch + 1, **logs})
        score = logs.get(self.monitor)
        if score is not None and score > self.best:
            self.best, self.best_epoch = score, epoch + 1
        if self.best_epoch == epoch + 1 and self.best_path is not None:
            tmp = self.best_path.with_name("tmp-" + self.best_path.name)
            self.model.net.save_weights(tmp)
            os.replace(tmp, self.best_path)
        save_checkpoint(self.model, self.directory, {
            "epoch": epoch + 1, "train_seconds": self.train_seconds, "best": self.best, "best_epoch": self.best_epoch,
            "monitor": self.monitor, "history": self.history,
        })
