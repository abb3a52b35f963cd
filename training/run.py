"""``python -m training.run``: robust (sparse) training with validation-based model selection.

The procedure: the method (``--method``, training/methods/) builds the network — from scratch, or from the
``--from`` run, training its earlier phases in ``phases/`` —, the final phase trains it with the robust
objective, and the selected epoch is tested once. Writes to ``--out``: ``model.keras`` (best validation epoch;
loads with ``keras.models.load_model`` after ``import bcs_tf``), ``metrics.json`` (test clean / PGD accuracy,
per-layer connectivity, wall time, config), ``config.json``, ``checkpoint/`` (resumable with ``--resume``),
``snapshots/`` (early weights, for lottery rewinding) and TensorBoard logs in ``logs/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import shutil
import sys
import time
import typing

from bcs_run import cli
from bcs_run.config import GROUPS, METHOD_FLAGS, RunConfig
from bcs_run.rundir import RunDir

ALIASES = {"from_run": ("--from",)}


def build_parser():
    """The ``training.run`` parser: one flag per RunConfig field, with the field's help, choices and default,
    grouped as in ``GROUPS``; then the flags of the invocation (resume, overwrite, verbose, report)."""
    p = cli.parser("python -m training.run", __doc__)
    p.usage = "%(prog)s [--objective O] [--method M] [--connectivity C] [--out DIR] [...] (flags below)"
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    defaults = RunConfig()
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        meta, default = field.metadata, getattr(defaults, field.name)
        flags = [*ALIASES.get(field.name, ()), "--" + field.name.replace("_", "-")]
        group = groups[meta["group"]]
        help_text = meta["help"] + (f" (default: {meta['shown']})" if meta["shown"] else "")
        if field.name in METHOD_FLAGS and field.name != "from_run":  # refused for the other methods
            help_text += f" [--method {'/'.join(METHOD_FLAGS[field.name])} only]"
        if isinstance(default, bool):
            group.add_argument(*flags, dest=field.name, action="store_true", help=help_text)
            continue
        kind = hints[field.name]
        kind = next(t for t in typing.get_args(kind) if t is not type(None)) if typing.get_args(kind) else kind
        metavar = meta["metavar"] or {int: "N", float: "X"}.get(kind, "TEXT")
        group.add_argument(*flags, dest=field.name, type=kind, default=default, choices=meta["choices"],
                           help=help_text, metavar=None if meta["choices"] else metavar)
    out = groups["output"]
    mode = out.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the stopped (or finished) run in --out; "
                      "only --epochs and --max-steps may change")
    mode.add_argument("--overwrite", action="store_true", help="replace the bcs-tf files of an existing run in --out")
    cli.add_verbose(out)
    out.add_argument("--no-report", action="store_true", help="skip report.md and the figures at the end")
    return p


def parse_args(argv=None):
    """Parse and validate the command line (without TensorFlow) into ``(RunConfig, options dict)``."""
    args = vars(build_parser().parse_args(argv))
    options = {k: args.pop(k) for k in ("resume", "overwrite", "verbose", "no_report")}
    cfg = RunConfig(**args)
    cli.check_writable(cfg.out, "--out")
    return cfg, options


def _differing_flags(saved, cfg):
    """The flags (``--name``) besides ``--epochs`` and ``--max-steps`` whose values differ between two configs; a
    default and the value it stands for (``--alpha`` unset and the α it means) are the same, so runs saved before
    a default was written resume."""
    saved = dataclasses.replace(saved, epochs=cfg.epochs, max_steps=cfg.max_steps, alpha=saved.effective_alpha,
                                budget=saved.effective_budget)
    cfg = dataclasses.replace(cfg, alpha=cfg.effective_alpha, budget=cfg.effective_budget)
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(cfg)
            if getattr(saved, f.name) != getattr(cfg, f.name)]


def prepare_out_dir(cfg, resume, overwrite, held):
    """Create ``cfg.out`` and lock it for the rest of ``held`` (a ``contextlib.ExitStack``): an existing one before
    anything in it is read or replaced, so a second process never resumes or overwrites a run being trained;
    refuse to touch an existing run unless ``--resume`` or ``--overwrite``."""
    from bcs_tf.checkpoint import has_checkpoint
    from bcs_tf.errors import CheckpointError

    out = pathlib.Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise cli.FlagError(f"--out: {out} exists and is not a directory")
    run = RunDir(out)
    locked = out.is_dir()
    if locked:
        held.enter_context(cli.exclusive(out, "--out"))
    existing = out.is_dir() and any(out.iterdir())
    if resume:
        if not (has_checkpoint(run.checkpoint) or run.phases.is_dir()):
            raise CheckpointError(f"--resume: no checkpoint to resume in {run.checkpoint}")
        try:
            saved = RunConfig.from_dict(json.loads(run.config.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"--resume: cannot read {run.config}: {exc}") from None
        differ = _differing_flags(saved, cfg)
        if differ:
            raise cli.FlagError(f"--resume: the flags differ from the run's config.json in {', '.join(differ)} "
                                "(only --epochs and --max-steps may change)")
    elif existing and not overwrite:
        raise cli.FlagError(f"--out: {out} is not empty; pass --overwrite to replace it or --resume to continue")
    elif existing:
        for name in RunDir.OWN:  # only our own files; anything else the user put there stays
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not locked:  # a new directory: of two processes that both made it, the second stops here
        held.enter_context(cli.exclusive(out, "--out"))
    run.write_json(RunDir.CONFIG, cfg.to_dict())
    return out


def train(cfg, held, resume=False, overwrite=False, verbose=1):
    """Run ``cfg.method``'s phases, the final training and the test evaluation; returns the metrics dict.
    ``cfg.out`` stays locked until ``held`` (a ``contextlib.ExitStack``) closes."""
    # imported here, not at the top, so that a bad flag is reported before TensorFlow loads
    from bcs_tf.data import load_dataset, load_extra_data
    from training.distribution import make_strategy
    from training.fitting import fit_phase
    from training.methods import METHODS, Context

    t_start = time.time()
    strategy = make_strategy(cfg.strategy)
    method = METHODS[cfg.method]
    data = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
    if cfg.extra_data:  # checked against the dataset before anything is written
        load_extra_data(cfg.extra_data, data.input_shape, data.num_classes)
    source_cfg = method.check_source(cfg, data.input_shape)  # a wrong --from stops before anything is written
    out = prepare_out_dir(cfg, resume, overwrite, held)
    ctx = Context(cfg, data, out, source_cfg, verbose)
    with strategy.scope():  # variables mirrored on every replica; fit splits each global batch among them
        start = method.start(ctx)
        trainer = ctx.trainer(start.net, start.allocation, rewire=start.rewire)
        saver = fit_phase(trainer, cfg, data, out, cfg.epochs, lr=start.lr, verbose=verbose,
                          snapshots=cfg.snapshots, max_steps=cfg.max_steps)
    return _test_and_save(ctx, start, trainer, saver, t_start)


def _test_and_save(ctx, start, trainer, saver, t_start):
    """The end of :func:`train`: test clean and PGD accuracy, write ``model.keras`` and ``metrics.json``."""
    from bcs_tf.checkpoint import check_before_save, write_h5
    from bcs_tf.connectivity import connectivity_report
    from bcs_tf.robustness import robust_accuracy

    cfg, data, out, verbose = ctx.cfg, ctx.data, ctx.out, ctx.verbose
    train_seconds = saver.train_seconds if saver.trained else saver.seconds_before

    net = start.net
    if cfg.precision != "float32":  # test and ship the trained weights at full precision
        net32, _ = ctx.build(start.kind, precision="float32")
        net32.set_weights(net.get_weights())
        net = net32
    print(f"test evaluation: clean and PGD-{cfg.eval_steps} (eps={cfg.eps}, restarts={cfg.eval_restarts})")
    clean, robust = robust_accuracy(net, data.x_test, data.y_test, cfg.eps, cfg.eval_steps,
                                    restarts=cfg.eval_restarts, seed=cfg.seed, verbose=verbose)
    run = RunDir(out)
    check_before_save(trainer, run.model)  # the shipped network has exactly its budget
    (out / RunDir.COMPLETE).unlink(missing_ok=True)  # finished again only once the new files are all written
    write_h5(run.model, net.save, net.weights)  # a full disk leaves no half-written model.keras behind
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
        "divergence_restores": saver.extra_state.get("restores", []),
        "input_shape": list(data.input_shape),
        "data_source": data.source,
        "history": saver.history,
        "config": cfg.to_dict(),
        "completion_marker": True,  # finished only once RunDir.COMPLETE is written (after the reports)
    }
    run.write_json(RunDir.METRICS, metrics)
    print(f"test clean acc {clean:.4f} | PGD-{cfg.eval_steps} acc {robust:.4f} | "
          f"connectivity {metrics['connectivity']['connectivity']:.4f} | wrote {out}")
    return metrics


@cli.one_line_errors
def main(argv=None):
    """CLI entry point: flags checked before TensorFlow loads; one-line errors (exit 2) for bad input."""
    cfg, options = parse_args(argv)
    cli.import_tensorflow(options["verbose"])
    with contextlib.ExitStack() as held:  # --out stays locked until its reports are written too
        train(cfg, held, options["resume"], options["overwrite"], options["verbose"])
        if not options["no_report"]:
            from training.report import write_reports

            write_reports([cfg.out])
        RunDir(cfg.out).mark_complete()
    return 0


if __name__ == "__main__":
    sys.exit(main())
