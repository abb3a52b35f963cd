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

from bcs_tf.checkpoint import DivergenceGuard, EpochCheckpoint, check_before_save, has_checkpoint, \
    load_checkpoint, read_state, write_h5
from bcs_tf.errors import DivergenceError
from bcs_tf.data import augment_batch, batches_per_epoch, labelled_split, load_extra_data, make_mixed_pipeline, \
    make_pipeline
from bcs_tf.layers import sparse_layers
from bcs_run.rundir import RunDir


MAX_RESTORES = 3  # --on-nan restore: roll back at most this many times per phase


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

    def __init__(self, run_dir, epochs):
        super().__init__()
        self.run = RunDir(run_dir)
        self.epochs = set(epochs)

    def save(self, epoch):
        """Save the weights as the run's snapshot of ``epoch`` if it is one of the listed ones."""
        if epoch in self.epochs:
            check_before_save(self.model, f"the snapshot of epoch {epoch}")
            path = self.run.snapshot(epoch)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_h5(path, self.model.net.save_weights, self.model.net.weights)

    def on_train_begin(self, logs=None):
        if not self.run.snapshot(0).exists():
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
        x_extra, y_extra = load_extra_data(cfg.extra_data, data.input_shape, data.num_classes)
        return make_mixed_pipeline(x_train, y_train, x_extra, y_extra, cfg.batch_size, cfg.extra_fraction,
                                   seed=cfg.seed, augment=augment, epochs=(initial_epoch, epochs))
    return make_pipeline(x_train, y_train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment,
                         epochs=(initial_epoch, epochs))


def steps_per_epoch(cfg, data):
    """Optimizer steps in one epoch of ``cfg`` on ``data``."""
    n = len(labelled_split(data.x_train, data.y_train, cfg.labelled_fraction)[0][0])
    return batches_per_epoch(n, cfg.batch_size, cfg.extra_fraction if cfg.extra_data else None)


def _checkpoint_every(cfg):
    """Steps between checkpoints within an epoch: "auto" (≈ 10 min, measured), None (epoch ends only) or N.

    Workers measure their own step times, so under several workers "auto" would checkpoint them at different
    steps and a resumed cluster would start its workers at different places: epoch ends only, unless N is given.
    """
    if cfg.checkpoint_every is None:
        return None if cfg.strategy == "multiworker" else "auto"
    return cfg.checkpoint_every or None


def fit_phase(trainer, cfg, data, directory, epochs, lr=None, verbose=1, select_best=True, snapshots=(),
              max_steps=None):
    """Train ``trainer`` for ``epochs`` epochs with checkpoints in ``directory``; returns the EpochCheckpoint.

    Continues from ``directory/checkpoint`` when it exists (one is written before the first epoch). With
    ``select_best`` the network ends with the weights of the best validation epoch (``cfg.select_by``), else
    with those of the last epoch. A step whose loss, gradients or weights are not finite stops training with
    :class:`DivergenceError` (the files on disk untouched); with ``cfg.on_nan == "restore"`` the phase instead
    rolls back to its last checkpoint and goes on at half the learning rate, at most ``MAX_RESTORES`` times.
    """
    directory = pathlib.Path(directory)
    ckpt_dir = directory / "checkpoint"
    state = read_state(ckpt_dir) if has_checkpoint(ckpt_dir) else {}
    restores = list(state.get("restores", []))
    while True:
        try:
            return _fit(trainer, cfg, data, directory, epochs, lr, verbose, select_best, snapshots, max_steps,
                        restores)
        except DivergenceError as exc:
            if cfg.on_nan != "restore" or len(restores) >= MAX_RESTORES:
                tried = f" after {len(restores)} restore(s)" if restores else ""
                raise DivergenceError(f"{exc}{tried}; the last checkpoint in {ckpt_dir} and the best weights are "
                                      "untouched" + ("" if cfg.on_nan == "restore" else
                                                     " (--on-nan restore rolls back and halves the learning rate)"))
            restores.append({"error": str(exc), "lr_scale": 0.5 ** (len(restores) + 1)})
            print(f"{exc}: rolling back to the last checkpoint, learning rate ×{restores[-1]['lr_scale']:g} "
                  f"(restore {len(restores)} of at most {MAX_RESTORES})")


def _fit(trainer, cfg, data, directory, epochs, lr, verbose, select_best, snapshots, max_steps, restores):
    """One attempt of :func:`fit_phase` at learning-rate scale 0.5^len(restores)."""
    per_epoch = steps_per_epoch(cfg, data)
    total_steps = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    scale = restores[-1]["lr_scale"] if restores else 1.0
    optimizer = cfg.make_optimizer(total_steps, lr, scale)
    if cfg.precision == "mixed_float16":  # float16 gradients underflow without a (dynamic) loss scale
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    trainer.compile(optimizer=optimizer, jit_compile=False)  # --jit: the trainer compiles its XLA-able part
    trainer.prepare()
    trainer.health.code.assign(0)
    ckpt_dir, best_path = directory / RunDir.CHECKPOINT, directory / RunDir.BEST
    state = None
    if has_checkpoint(ckpt_dir):
        state = load_checkpoint(trainer, ckpt_dir)
        if state["epoch"] or state.get("step_in_epoch") or restores:
            within = f" and step {state['step_in_epoch']} of the next" if state.get("step_in_epoch") else ""
            print(f"resuming {directory} after epoch {state['epoch']}{within} "
                  f"(best {state['monitor']} {state['best']:.4f})")
    monitor = {"robust": "val_robust_acc", "clean": "val_clean_acc", "last": "last"}[cfg.select_by]
    skip = state.get("step_in_epoch", 0) if state else 0
    saver = EpochCheckpoint(ckpt_dir, best_path if select_best else None, monitor=monitor, resumed_state=state,
                            extra_state={"restores": restores}, keep=cfg.keep_checkpoints, steps_per_epoch=per_epoch,
                            every=_checkpoint_every(cfg),
                            step_offset=skip)
    if state is None:  # the point to roll back to when the first epoch diverges
        check_before_save(trainer, "the initial network")
        saver.set_model(trainer)
        saver.save(0)
    callbacks = [DivergenceGuard(), saver, keras.callbacks.TensorBoard(directory / "logs", write_graph=False)]
    if sparse_layers(trainer.net):
        callbacks.insert(1, ConnectivityLog())
    if snapshots:
        callbacks.append(Snapshots(directory, snapshots))
    if max_steps is not None:
        callbacks.append(StopAfterSteps(max_steps))
    initial_epoch = state["epoch"] if state else 0
    last_epoch = min(epochs, math.ceil(total_steps / per_epoch))
    val_ds = make_pipeline(data.x_val, data.y_val, 256) if len(data.x_val) else None
    saver.trained = initial_epoch < last_epoch
    fit = functools.partial(trainer.fit, validation_data=val_ds, shuffle=False, callbacks=callbacks, verbose=verbose)
    if saver.trained and skip:  # the rest of an epoch a mid-epoch checkpoint interrupted, on the same batches
        fit(train_pipeline(cfg, data, initial_epoch, initial_epoch + 1).skip(skip), epochs=initial_epoch + 1,
            initial_epoch=initial_epoch, steps_per_epoch=per_epoch - skip)
        initial_epoch += 1
    if initial_epoch < last_epoch and not trainer.stop_training:
        fit(train_pipeline(cfg, data, initial_epoch, last_epoch), epochs=last_epoch, initial_epoch=initial_epoch,
            steps_per_epoch=per_epoch)
    if select_best and best_path.is_file():
        trainer.net.load_weights(best_path)
    return saver
