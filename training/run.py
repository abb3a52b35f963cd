"""``python -m training.run``: robust (sparse) training with validation-based model selection.

Writes to ``--out``: ``model.keras`` (best validation epoch; loads with ``keras.models.load_model`` after
``import bcs_tf``), ``metrics.json`` (test clean / PGD accuracy, per-layer connectivity, wall time, config),
``config.json``, ``checkpoint/`` (resumable with ``--resume``) and TensorBoard logs in ``logs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from bcs_tf.checkpoint import EpochCheckpoint, has_checkpoint, load_checkpoint  # noqa: E402
from bcs_tf.connectivity import connectivity_report  # noqa: E402
from bcs_tf.data import (augment_batch, batches_per_epoch, labelled_split, load_dataset, load_extra_data,  # noqa: E402
                         make_mixed_pipeline, make_pipeline)  # noqa: E402
from bcs_tf.errors import CheckpointError, ConfigError, one_line_errors  # noqa: E402
from bcs_tf.evaluation import robust_accuracy  # noqa: E402
from bcs_tf.models import build_model  # noqa: E402
from bcs_tf.objectives import make_objective  # noqa: E402
from bcs_tf.trainer import RobustTrainer  # noqa: E402
from training.config import OPTIMIZER_NAMES, SCHEDULE_NAMES, RunConfig  # noqa: E402

RUN_FILES = ("model.keras", "metrics.json", "config.json", "best.weights.h5", "checkpoint", "logs")


def parse_args(argv=None):
    """Parse the command line into ``(RunConfig, resume, overwrite, verbose)``."""
    p = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = RunConfig()
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
            continue
        kind = {"connectivity": float, "lr": float, "momentum": float, "weight_decay": float, "eps": float,
                "attack_step_size": float, "beta": float, "alpha": float, "temperature": float,
                "labelled_fraction": float, "extra_fraction": float}.get(field.name)
        if kind is None:
            kind = int if isinstance(default, int) or field.name == "max_steps" else str
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--resume", action="store_true", help="continue the stopped run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras progress output")
    args = vars(p.parse_args(argv))
    resume, overwrite, verbose = args.pop("resume"), args.pop("overwrite"), args.pop("verbose")
    return RunConfig(**args), resume, overwrite, verbose


def prepare_out_dir(cfg, resume, overwrite):
    """Create ``cfg.out``; refuse to touch an existing run unless ``--resume`` or ``--overwrite``."""
    out = pathlib.Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    existing = out.is_dir() and any(out.iterdir())
    if resume:
        if not has_checkpoint(out / "checkpoint"):
            raise CheckpointError(f"--resume: no checkpoint to resume in {out / 'checkpoint'}")
        saved = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
        if dataclasses.replace(saved, epochs=cfg.epochs, max_steps=cfg.max_steps) != cfg:
            raise ConfigError("--resume: the flags differ from the run's config.json (only --epochs and "
                              "--max-steps may change)")
    elif existing and not overwrite:
        raise ConfigError(f"--out: {out} is not empty; pass --overwrite to replace it or --resume to continue")
    elif existing:
        for name in RUN_FILES:  # only our own files; anything else the user put there stays
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return out


def _piecewise(cfg, total_steps):
    boundaries = [max(1, int(0.5 * total_steps)), max(2, int(0.75 * total_steps))]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [cfg.lr, cfg.lr * 0.1, cfg.lr * 0.01])


SCHEDULES = {
    "piecewise": _piecewise,  # authors: ×0.1 at 50% and at 75% of training
    "cosine": lambda cfg, total_steps: keras.optimizers.schedules.CosineDecay(cfg.lr, max(1, total_steps)),
    "constant": lambda cfg, total_steps: cfg.lr,
}
OPTIMIZERS = {
    "sgd": lambda lr, cfg, wd: keras.optimizers.SGD(lr, momentum=cfg.momentum, weight_decay=wd),
    "adam": lambda lr, cfg, wd: keras.optimizers.Adam(lr, weight_decay=wd),
    "adamw": lambda lr, cfg, wd: keras.optimizers.AdamW(lr, weight_decay=wd),
    "rmsprop": lambda lr, cfg, wd: keras.optimizers.RMSprop(lr, momentum=cfg.momentum, weight_decay=wd),
}


assert set(SCHEDULES) == set(SCHEDULE_NAMES) and set(OPTIMIZERS) == set(OPTIMIZER_NAMES)


def make_optimizer(cfg, total_steps):
    """Optimizer ``cfg.optimizer`` on schedule ``cfg.lr_schedule`` with decoupled weight decay.

    Keras applies θ ← θ − lr_t·weight_decay·θ, so passing wd/lr0 makes the decay follow the learning-rate
    schedule exactly as the authors' wd_t does (checked bit-exact for SGD).
    """
    schedule = SCHEDULES[cfg.lr_schedule](cfg, total_steps)
    return OPTIMIZERS[cfg.optimizer](schedule, cfg, cfg.weight_decay / cfg.lr if cfg.lr > 0 else 0.0)


class StopAfterSteps(keras.callbacks.Callback):
    """Stop training after a total number of optimizer steps (for smoke runs)."""

    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.max_steps:
            self.model.stop_training = True


def train(cfg, resume=False, overwrite=False, verbose=1):
    """Run training + final test evaluation for ``cfg``; returns the metrics dict."""
    out = prepare_out_dir(cfg, resume, overwrite)
    t_start = time.time()
    data = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
    net, allocation = build_model(cfg.model, cfg.method, cfg.connectivity, cfg.budget, cfg.seed,
                                  data.input_shape, data.num_classes, precision=cfg.precision)
    (x_train, y_train), _ = labelled_split(data.x_train, data.y_train, cfg.labelled_fraction)
    steps_per_epoch = batches_per_epoch(len(x_train), cfg.batch_size, cfg.extra_fraction if cfg.extra_data else None)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps,
                                                                                 cfg.epochs * steps_per_epoch)
    trainer = RobustTrainer(net, make_objective(cfg.objective, cfg.beta), cfg.attack(), allocation=allocation,
                            rewire=cfg.method == "bcs", temperature=cfg.effective_temperature, alpha=cfg.alpha,
                            seed=cfg.seed)
    trainer.compile(optimizer=make_optimizer(cfg, total_steps), jit_compile=False)
    trainer.prepare()

    ckpt_dir, best_path = out / "checkpoint", out / "best.weights.h5"
    state = None
    if resume:
        state = load_checkpoint(trainer, ckpt_dir)
        print(f"resuming {out} after epoch {state['epoch']} (best {state['monitor']} {state['best']:.4f})")
    monitor = "val_robust_acc" if cfg.select_by == "robust" else "val_clean_acc"
    saver = EpochCheckpoint(ckpt_dir, best_path, monitor=monitor, resumed_state=state)
    callbacks = [saver, keras.callbacks.TensorBoard(out / "logs", write_graph=False)]
    if cfg.max_steps is not None:
        callbacks.append(StopAfterSteps(cfg.max_steps))
    initial_epoch = state["epoch"] if state else 0
    epochs = min(cfg.epochs, math.ceil(total_steps / steps_per_epoch))
    # Batches (order, extra data and augmentation) depend only on (seed, epoch, step), so a resumed run trains on
    # the same batches as an uninterrupted one.
    augment = functools.partial(augment_batch, flip=not cfg.no_flip) if cfg.augmented else None
    if cfg.extra_data:  # RST: every batch mixes labelled and pseudo-labelled examples
        x_extra, y_extra = load_extra_data(cfg.extra_data)
        train_ds = make_mixed_pipeline(x_train, y_train, x_extra, y_extra, cfg.batch_size, cfg.extra_fraction,
                                       seed=cfg.seed, augment=augment, epochs=(initial_epoch, epochs))
    else:
        train_ds = make_pipeline(x_train, y_train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment,
                                 epochs=(initial_epoch, epochs))
    val_ds = make_pipeline(data.x_val, data.y_val, 256) if len(data.x_val) else None
    if initial_epoch < epochs:
        trainer.fit(train_ds, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                    validation_data=val_ds, shuffle=False,
                    callbacks=callbacks, verbose=verbose)
    train_seconds = saver.train_seconds if initial_epoch < epochs else saver.seconds_before

    if best_path.is_file():
        net.load_weights(best_path)
    if cfg.precision != "float32":  # test and ship the trained weights at full precision
        net32, _ = build_model(cfg.model, cfg.method, cfg.connectivity, cfg.budget, cfg.seed, data.input_shape,
                               data.num_classes)
        net32.set_weights(net.get_weights())
        net = net32
    print(f"test evaluation: clean and PGD-{cfg.eval_steps} (eps={cfg.eps}, restarts={cfg.eval_restarts})")
    clean, robust = robust_accuracy(net, data.x_test, data.y_test, cfg.eps, cfg.eval_steps,
                                    restarts=cfg.eval_restarts, seed=cfg.seed, verbose=verbose)
    net.save(out / "model.keras")
    metrics = {
        "test_clean_acc": clean,
        f"test_pgd{cfg.eval_steps}_acc": robust,
        "best_epoch": saver.best_epoch,
        "selected_by": monitor,
        "steps": int(trainer.optimizer.iterations.numpy()),
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - t_start,
        "connectivity": connectivity_report(net) if cfg.sparse else {"connectivity": 1.0},
        "allocation": allocation.to_dict() if allocation else None,
        "data_source": data.source,
        "history": saver.history,
        "config": cfg.to_dict(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"test clean acc {clean:.4f} | PGD-{cfg.eval_steps} acc {robust:.4f} | "
          f"connectivity {metrics['connectivity']['connectivity']:.4f} | wrote {out}")
    return metrics


@one_line_errors
def main(argv=None):
    """CLI entry point: one-line errors (exit 2) instead of tracebacks for bad input."""
    cfg, resume, overwrite, verbose = parse_args(argv)
    train(cfg, resume, overwrite, verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
