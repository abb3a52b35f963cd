"""``python -m training.run``: robust (sparse) training with validation-based model selection.

The procedure: the method (``--method``, training/methods/) builds the network — from scratch, or from the
``--from`` run, training its earlier phases in ``phases/`` —, the final phase trains it with the robust
objective, and the selected epoch is tested once. Writes to ``--out``: ``model.keras`` (best validation epoch;
loads with ``keras.models.load_model`` after ``import bcs_tf``), ``metrics.json`` (test clean / PGD accuracy,
per-layer connectivity, wall time, config), ``config.json``, ``checkpoint/`` (resumable with ``--resume``),
``snapshots/`` (early weights, for lottery rewinding) and TensorBoard logs in ``logs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
import typing

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bcs_tf.checkpoint import has_checkpoint  # noqa: E402
from bcs_tf.connectivity import connectivity_report  # noqa: E402
from bcs_tf.data import load_dataset  # noqa: E402
from bcs_tf.errors import CheckpointError, ConfigError, one_line_errors  # noqa: E402
from bcs_tf.evaluation import robust_accuracy  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.fitting import fit_phase  # noqa: E402
from training.methods import METHODS, Context  # noqa: E402

RUN_FILES = ("model.keras", "metrics.json", "config.json", "best.weights.h5", "checkpoint", "logs", "phases",
             "snapshots")
ALIASES = {"from_run": ("--from",)}


def parse_args(argv=None):
    """Parse the command line into ``(RunConfig, resume, overwrite, verbose)``."""
    p = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = RunConfig()
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
            continue
        kind = hints[field.name]
        kind = next(t for t in typing.get_args(kind) if t is not type(None)) if typing.get_args(kind) else kind
        p.add_argument(flag, *ALIASES.get(field.name, ()), type=kind, default=default)
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
        if not (has_checkpoint(out / "checkpoint") or (out / "phases").is_dir()):
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


def train(cfg, resume=False, overwrite=False, verbose=1):
    """Run ``cfg.method``'s phases, the final training and the test evaluation; returns the metrics dict."""
    t_start = time.time()
    method = METHODS[cfg.method]
    data = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
    source_cfg = method.check_source(cfg, data.input_shape)  # a wrong --from stops before anything is written
    out = prepare_out_dir(cfg, resume, overwrite)
    ctx = Context(cfg, data, out, source_cfg, verbose)
    start = method.start(ctx)
    trainer = ctx.trainer(start.net, start.allocation, rewire=start.rewire)
    saver = fit_phase(trainer, cfg, data, out, cfg.epochs, lr=start.lr, verbose=verbose, snapshots=cfg.snapshots,
                      max_steps=cfg.max_steps)
    train_seconds = saver.train_seconds if saver.trained else saver.seconds_before

    net = start.net
    if cfg.precision != "float32":  # test and ship the trained weights at full precision
        net32, _ = ctx.build(start.kind, precision="float32")
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
        "selected_by": saver.monitor,
        "steps": int(trainer.optimizer.iterations.numpy()),
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - t_start,
        "connectivity": connectivity_report(net) if cfg.sparse else {"connectivity": 1.0},
        "allocation": start.allocation.to_dict() if start.allocation else None,
        "method": {"name": cfg.method, **start.info},
        "input_shape": list(data.input_shape),
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
