"""One training phase: optimizer and schedule, resumable checkpoints, the epoch-keyed input pipeline, ``fit``.

``training.run`` trains every network through :func:`fit_phase`, and so do the methods' earlier phases
(HYDRA's score learning, the rounds of iterative pruning), each in a directory of its own: a phase whose
directory holds a checkpoint continues from it, so a killed run resumes inside any phase.
"""

from __future__ import annotations

import functools
import math
import pathlib

import keras

from bcs_tf.checkpoint import EpochCheckpoint, has_checkpoint, load_checkpoint
from bcs_tf.data import augment_batch, batches_per_epoch, labelled_split, load_extra_data, make_mixed_pipeline, \
    make_pipeline
from bcs_tf.layers import sparse_layers
from training.config import OPTIMIZER_NAMES, SCHEDULE_NAMES


def _piecewise(cfg, total_steps, lr):
    boundaries = [max(1, int(0.5 * total_steps)), max(2, int(0.75 * total_steps))]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [lr, lr * 0.1, lr * 0.01])


SCHEDULES = {
    "piecewise": _piecewise,  # authors: ×0.1 at 50% and at 75% of training
    "cosine": lambda cfg, total_steps, lr: keras.optimizers.schedules.CosineDecay(lr, max(1, total_steps)),
    "constant": lambda cfg, total_steps, lr: lr,
}
OPTIMIZERS = {
    "sgd": lambda lr, cfg, wd: keras.optimizers.SGD(lr, momentum=cfg.momentum, weight_decay=wd),
    "adam": lambda lr, cfg, wd: keras.optimizers.Adam(lr, weight_decay=wd),
    "adamw": lambda lr, cfg, wd: keras.optimizers.AdamW(lr, weight_decay=wd),
    "rmsprop": lambda lr, cfg, wd: keras.optimizers.RMSprop(lr, momentum=cfg.momentum, weight_decay=wd),
}
assert set(SCHEDULES) == set(SCHEDULE_NAMES) and set(OPTIMIZERS) == set(OPTIMIZER_NAMES)


def make_optimizer(cfg, total_steps, lr=None):
    """Optimizer ``cfg.optimizer`` on schedule ``cfg.lr_schedule`` from ``lr`` (default ``cfg.lr``).

    Keras applies θ ← θ − lr_t·weight_decay·θ, so passing wd/lr0 makes the decay follow the learning-rate
    schedule exactly as the authors' wd_t does (checked bit-exact for SGD).
    """
    lr = cfg.lr if lr is None else lr
    schedule = SCHEDULES[cfg.lr_schedule](cfg, total_steps, lr)
    return OPTIMIZERS[cfg.optimizer](schedule, cfg, cfg.weight_decay / lr if lr > 0 else 0.0)


class StopAfterSteps(keras.callbacks.Callback):
    """Stop training after a total number of optimizer steps (for smoke runs)."""

    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.max_steps:
            self.model.stop_training = True


class ConnectivityLog(keras.callbacks.Callback):
    """Add each sparse layer's active connection count to the epoch logs as ``active/LAYER``.

    Placed before the checkpoint callback, so the counts reach the run's history (metrics.json) and TensorBoard.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            for layer in sparse_layers(self.model.net):
                logs[f"active/{layer.name}"] = layer.active_count()


class Snapshots(keras.callbacks.Callback):
    """Save the network's weights before training (epoch 0) and after the listed epochs (lottery rewinding)."""

    def __init__(self, directory, epochs):
        super().__init__()
        self.directory = pathlib.Path(directory)
        self.epochs = set(epochs)

    def save(self, epoch):
        if epoch in self.epochs:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.model.net.save_weights(self.directory / f"epoch_{epoch}.weights.h5")

    def on_train_begin(self, logs=None):
        if not (self.directory / "epoch_0.weights.h5").exists():
            self.save(0)

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1)


def train_pipeline(cfg, data, initial_epoch, epochs):
    """The training batches for epochs [initial_epoch, epochs).

    Batches (order, extra data and augmentation) depend only on (seed, epoch, step), so a resumed phase
    trains on the same batches as an uninterrupted one.
    """
    (x_train, y_train), _ = labelled_split(data.x_train, data.y_train, cfg.labelled_fraction)
    augment = functools.partial(augment_batch, flip=not cfg.no_flip) if cfg.augmented else None
    if cfg.extra_data:  # RST: every batch mixes labelled and pseudo-labelled examples
        x_extra, y_extra = load_extra_data(cfg.extra_data)
        return make_mixed_pipeline(x_train, y_train, x_extra, y_extra, cfg.batch_size, cfg.extra_fraction,
                                   seed=cfg.seed, augment=augment, epochs=(initial_epoch, epochs))
    return make_pipeline(x_train, y_train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment,
                         epochs=(initial_epoch, epochs))


def steps_per_epoch(cfg, data):
    """Optimizer steps in one epoch of ``cfg`` on ``data``."""
    n = len(labelled_split(data.x_train, data.y_train, cfg.labelled_fraction)[0][0])
    return batches_per_epoch(n, cfg.batch_size, cfg.extra_fraction if cfg.extra_data else None)


def fit_phase(trainer, cfg, data, directory, epochs, lr=None, verbose=1, select_best=True, snapshots=(),
              max_steps=None):
    """Train ``trainer`` for ``epochs`` epochs with checkpoints in ``directory``; returns the EpochCheckpoint.

    Continues from ``directory/checkpoint`` when it exists. With ``select_best`` the network ends with the
    weights of the best validation epoch (``cfg.select_by``), else with those of the last epoch.
    """
    directory = pathlib.Path(directory)
    per_epoch = steps_per_epoch(cfg, data)
    total_steps = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    trainer.compile(optimizer=make_optimizer(cfg, total_steps, lr), jit_compile=False)
    trainer.prepare()
    ckpt_dir, best_path = directory / "checkpoint", directory / "best.weights.h5"
    state = None
    if has_checkpoint(ckpt_dir):
        state = load_checkpoint(trainer, ckpt_dir)
        print(f"resuming {directory} after epoch {state['epoch']} (best {state['monitor']} {state['best']:.4f})")
    monitor = "val_robust_acc" if cfg.select_by == "robust" else "val_clean_acc"
    saver = EpochCheckpoint(ckpt_dir, best_path if select_best else None, monitor=monitor, resumed_state=state)
    callbacks = [saver, keras.callbacks.TensorBoard(directory / "logs", write_graph=False)]
    if sparse_layers(trainer.net):
        callbacks.insert(0, ConnectivityLog())
    if snapshots:
        callbacks.append(Snapshots(directory / "snapshots", snapshots))
    if max_steps is not None:
        callbacks.append(StopAfterSteps(max_steps))
    initial_epoch = state["epoch"] if state else 0
    last_epoch = min(epochs, math.ceil(total_steps / per_epoch))
    train_ds = train_pipeline(cfg, data, initial_epoch, last_epoch)
    val_ds = make_pipeline(data.x_val, data.y_val, 256) if len(data.x_val) else None
    saver.trained = initial_epoch < last_epoch
    if saver.trained:
        trainer.fit(train_ds, epochs=last_epoch, initial_epoch=initial_epoch, steps_per_epoch=per_epoch,
                    validation_data=val_ds, shuffle=False, callbacks=callbacks, verbose=verbose)
    if select_best and best_path.is_file():
        trainer.net.load_weights(best_path)
    return saver
