"""Resumable training checkpoints: weights (θ, γ, BatchNorm, optimizer slots), RNG states and progress.

A checkpoint directory holds, per saved step N, ``ckpt-N.weights.h5`` (Keras' own format: network and
optimizer variables) and ``ckpt-N.json`` (epoch, step within it, best validation score, seed-generator
states), and ``state.json``, a copy of the newest ``ckpt-N.json``. Each file is written under a temporary name
and renamed; ``state.json`` is renamed last and names its weights file, so it is the commit point: a process
killed at any moment of a save leaves the previous checkpoint loadable. The last ``keep`` checkpoints are kept
(an unreadable ``state.json`` falls back to the newest complete one). Directories written before this layout
(``weights.weights.h5`` + ``state.json``) still load.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import time

import keras
import numpy as np

from bcs_tf.errors import CheckpointError, DivergenceError, StorageError

LEGACY_WEIGHTS = "weights.weights.h5"
STATE = "state.json"
FORMAT = 2  # state.json layout; 1 = the legacy single-file layout
KEEP = 2
_REQUIRED = ("epoch", "rng")  # what every checkpoint has; the training loop adds best, monitor, history


def _seed_generators(trainer):
    return {"attack_seed": trainer.attack_seed, "sampler_seed": trainer.sampler_seed}


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# HDF5 reports a full disk in its message, not as an errno; and it may crash the process afterwards when the
# file it failed to write is closed, so a write that cannot fit is refused before it starts (write_h5)
HEADROOM = 1.1
HEADROOM_BYTES = 1 << 20


def _no_space(exc):
    return getattr(exc, "errno", None) in NO_SPACE or "No space left on device" in str(exc)


def replace_atomically(path, write, needed_bytes=0):
    """``write(tmp)`` then rename onto ``path``; a failed write leaves ``path`` as it was and no temporary file,
    and a full disk (or fewer free bytes than ``needed_bytes``) is a one-line StorageError."""
    path = pathlib.Path(path)
    tmp = path.with_name("tmp-" + path.name)
    if needed_bytes and shutil.disk_usage(path.parent).free < needed_bytes:
        raise StorageError(f"no space left on device while writing {path} ({needed_bytes:,} bytes needed, "
                           f"{shutil.disk_usage(path.parent).free:,} free)")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and _no_space(exc):
            raise StorageError(f"no space left on device while writing {path}") from None
        raise


def write_h5(path, save, variables):
    """Write a Keras weights (or ``.keras``) file with ``save(tmp_path)`` atomically, refusing it up front when
    the disk has no room for ``variables`` (their bytes, plus headroom)."""
    size = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    replace_atomically(path, save, int(size * HEADROOM) + HEADROOM_BYTES)


def save_checkpoint(trainer, directory, state, keep=KEEP):
    """Save ``trainer`` (network + optimizer + RNG) and the JSON-serialisable ``state`` dict atomically, as
    checkpoint number ``trainer.optimizer.iterations``; keeps the newest ``keep`` checkpoints."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{int(trainer.optimizer.iterations.numpy()):09d}"
    full_state = {**state, "format": FORMAT, "weights": f"{name}.weights.h5",
                  "rng": {k: np.asarray(g.state.numpy()).tolist() for k, g in _seed_generators(trainer).items()}}
    text = json.dumps(full_state, indent=1)
    optimizer = getattr(trainer, "optimizer", None)
    write_h5(directory / full_state["weights"], trainer.save_weights,
             list(trainer.weights) + list(optimizer.variables if optimizer is not None else []))
    try:
        replace_atomically(directory / f"{name}.json", lambda p: p.write_text(text))
        replace_atomically(directory / STATE, lambda p: p.write_text(text))
    except BaseException:  # no half checkpoint: state.json (renamed last) still names the previous one
        (directory / full_state["weights"]).unlink(missing_ok=True)
        (directory / f"{name}.json").unlink(missing_ok=True)
        raise
    for old in _checkpoint_names(directory)[:-keep]:
        for path in (directory / f"{old}.weights.h5", directory / f"{old}.json"):
            path.unlink(missing_ok=True)


def _checkpoint_names(directory):
    """Names ``ckpt-N`` of the complete numbered checkpoints in ``directory``, oldest first."""
    names = sorted(p.name[:-len(".json")] for p in directory.glob("ckpt-*.json")
                   if re.fullmatch(r"ckpt-\d+\.json", p.name))
    return [n for n in names if (directory / f"{n}.weights.h5").is_file()]


def _parse_state(path):
    state = json.loads(path.read_text())
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise KeyError(f"missing {', '.join(missing)}")
    if state.get("format", 1) > FORMAT:
        raise ValueError(f"written by a newer bcs-tf (format {state['format']}, this one reads ≤ {FORMAT})")
    state.setdefault("weights", LEGACY_WEIGHTS)
    return state


def has_checkpoint(directory):
    """Whether ``directory`` holds a checkpoint (it may still turn out corrupt when read)."""
    directory = pathlib.Path(directory)
    return (directory / STATE).is_file() or bool(_checkpoint_names(directory))


def read_state(directory):
    """The JSON state of the newest readable checkpoint in ``directory`` (epoch, best score, history, …; key
    ``weights`` names its weights file). Raises CheckpointError."""
    directory = pathlib.Path(directory)
    if not has_checkpoint(directory):
        raise CheckpointError(f"no checkpoint in {directory} (expected {STATE})")
    candidates = [directory / STATE] + [directory / f"{n}.json" for n in reversed(_checkpoint_names(directory))]
    problems = []
    for path in candidates:
        try:
            state = _parse_state(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path.name}: {exc}")
            continue
        if (directory / state["weights"]).is_file():
            return state
        problems.append(f"{path.name}: its weights file {state['weights']} is missing")
    raise CheckpointError(f"corrupt checkpoint in {directory}: {'; '.join(problems)}")


def load_checkpoint(trainer, directory):
    """Restore ``trainer`` from ``directory``; returns the saved state dict. Raises CheckpointError."""
    directory = pathlib.Path(directory)
    state = read_state(directory)
    rng = state["rng"]
    try:
        trainer.load_weights(directory / state["weights"])
    except Exception as exc:  # h5py/Keras raise OSError, ValueError, KeyError... for bad files
        raise CheckpointError(
            f"corrupt or incompatible checkpoint {directory / state['weights']}: {type(exc).__name__}: "
            f"{str(exc)[:200]}"
        ) from None
    for key, generator in _seed_generators(trainer).items():
        generator.state.assign(np.asarray(rng[key], dtype=generator.state.dtype))
    trainer.health.code.assign(0)
    return state


def load_network_from_checkpoint(net, directory):
    """Load into ``net`` the network weights of the newest training checkpoint in ``directory`` (the trainer's
    file also holds the optimizer's); returns the saved state dict. Raises CheckpointError."""
    import tempfile

    import h5py

    directory = pathlib.Path(directory)
    state = read_state(directory)
    path = directory / state["weights"]
    try:
        with h5py.File(path, "r") as trainer_file, tempfile.TemporaryDirectory() as tmp:
            nets = list(trainer_file["layers"].keys())  # Keras stores the trainer's one sub-model under its path
            if len(nets) != 1:
                raise ValueError(f"one network expected in the trainer's file, found {nets}")
            part = pathlib.Path(tmp) / "net.weights.h5"
            with h5py.File(part, "w") as net_file:
                for key in ("layers", "vars"):
                    trainer_file.copy(trainer_file[f"layers/{nets[0]}/{key}"], net_file, key)
            net.load_weights(part)
    except Exception as exc:  # h5py/Keras raise OSError, ValueError, KeyError... for bad or foreign files
        raise CheckpointError(f"corrupt or incompatible checkpoint {path}: {type(exc).__name__}: "
                              f"{str(exc)[:200]}") from None
    return state


def check_before_save(trainer, what):
    """Raise DivergenceError instead of saving ``what`` when the trainer's weights are not finite or break
    the connection budget."""
    problem = trainer.health.problem() or trainer.budget_problem()
    if problem:
        raise DivergenceError(f"refusing to save {what}: {problem}")


class DivergenceGuard(keras.callbacks.Callback):
    """Stop training at the first step whose loss, gradients or updated weights are NaN or Inf.

    Raises :class:`DivergenceError` from inside ``fit``, so no epoch-end callback runs: the last checkpoint
    and the best weights on disk stay as they were.
    """

    def on_train_batch_end(self, batch, logs=None):
        problem = self.model.health.problem()
        if problem:
            step = int(self.model.optimizer.iterations.numpy())
            raise DivergenceError(f"training diverged at step {step}: {problem} became NaN or Inf")


class EpochCheckpoint(keras.callbacks.Callback):
    """Keras callback: checkpoint at every epoch end (and every ``every`` steps within an epoch) and keep the
    best network weights.

    The best epoch is chosen by ``monitor`` (default ``val_robust_acc``, higher is better) on the
    validation split, or is always the newest with ``monitor="last"``; its network weights go to ``best_path``
    (not kept when ``best_path`` is None).
    ``every="auto"`` checkpoints about every ``auto_seconds`` of training, from the step time measured on the
    first steps; None only at epoch ends. ``step_offset`` is the step within the first epoch at which this
    ``fit`` starts (a resumed mid-epoch checkpoint).
    """

    def __init__(self, directory, best_path, monitor="val_robust_acc", resumed_state=None, extra_state=None,
                 every=None, keep=KEEP, steps_per_epoch=None, step_offset=0, auto_seconds=600.0):
        super().__init__()
        state = resumed_state or {}
        self.extra_state = extra_state if extra_state is not None else {}  # saved as is (e.g. lr scale)
        self.directory = pathlib.Path(directory)
        self.best_path = pathlib.Path(best_path) if best_path is not None else None
        self.monitor = monitor
        self.best = state.get("best", -np.inf)
        self.best_epoch = state.get("best_epoch")
        self.history = list(state.get("history", []))
        self.seconds_before = state.get("train_seconds", 0.0)
        self.every, self.keep, self.steps_per_epoch = every, keep, steps_per_epoch
        self.step_offset, self.auto_seconds = step_offset, auto_seconds
        self._epoch, self._step_times = 0, []
        self._t0 = time.time()

    @property
    def train_seconds(self):
        """Training wall time so far, including the runs this one resumed."""
        return self.seconds_before + time.time() - self._t0

    def on_train_begin(self, logs=None):
        self._t0 = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.step_offset = 0
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.history.append({"epoch": epoch + 1, **logs})
        score = epoch + 1 if self.monitor == "last" else logs.get(self.monitor)
        if score is not None and score > self.best:
            self.best, self.best_epoch = score, epoch + 1
        check_before_save(self.model, f"epoch {epoch + 1}")
        if self.best_epoch == epoch + 1 and self.best_path is not None:
            write_h5(self.best_path, self.model.net.save_weights, self.model.net.weights)
        self.save(epoch + 1)

    def on_train_batch_begin(self, batch, logs=None):
        if self.every == "auto":
            self._step_times.append(time.perf_counter())

    def on_train_batch_end(self, batch, logs=None):
        step = self.step_offset + batch + 1  # steps done in the current epoch
        if self.every == "auto" and len(self._step_times) == 6:  # step 1 traces; time steps 2–6
            seconds = (time.perf_counter() - self._step_times[1]) / 5
            self.every = max(1, round(self.auto_seconds / max(seconds, 1e-9)))
        if isinstance(self.every, int) and step % self.every == 0 and step < (self.steps_per_epoch or step + 1):
            check_before_save(self.model, f"step {step} of epoch {self._epoch + 1}")
            self.save(self._epoch, step_in_epoch=step)

    def save(self, epoch, step_in_epoch=0):
        """Checkpoint the trainer after ``epoch`` whole epochs and ``step_in_epoch`` steps of the next one."""
        save_checkpoint(self.model, self.directory, {
            "epoch": epoch, "step_in_epoch": step_in_epoch, "train_seconds": self.train_seconds, "best": self.best,
            "best_epoch": self.best_epoch, "monitor": self.monitor, "history": self.history, **self.extra_state,
        }, keep=self.keep)
