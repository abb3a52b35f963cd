"""``python -m training.pseudolabel RUN_DIR --out FILE.npz``: pseudo-label an unlabelled pool for RST.

The pool is either the part of the run's training set outside ``--labelled-fraction`` (labels hidden: the
semi-supervised setting measured on Fashion-MNIST), or an external ``--pool FILE.npz`` with an array ``x``
(e.g. extra images for CIFAR-10). The teacher is the run's ``model.keras``. The output ``.npz`` holds ``x`` and
the pseudo-labels ``y`` (and ``y_true`` when the pool came from the labelled dataset, to measure label quality);
``training.run --objective rst --extra-data FILE`` mixes it into every batch.
"""

from __future__ import annotations

import pathlib
import sys

from bcs_run import cli


def pseudo_label(model, x, batch_size=512):
    """Teacher predictions (argmax of the logits) for ``x``."""
    import numpy as np

    return np.concatenate([np.argmax(np.asarray(model(x[i:i + batch_size], training=False)), 1)
                           for i in range(0, len(x), batch_size)]).astype(np.int32)


def build_parser():
    """The ``training.pseudolabel`` parser."""
    p = cli.parser("python -m training.pseudolabel", __doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the teacher run (trained on the labelled part)")
    p.add_argument("--out", required=True, help="output .npz (x, pseudo-labels y, and y_true for a dataset pool)")
    p.add_argument("--labelled-fraction", type=float, default=None,
                   help="pool = the training set beyond this fraction (default: the teacher's own fraction)")
    p.add_argument("--pool", help="external .npz with an array x of images in [0, 1] (instead of the dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    cli.add_verbose(p)
    return p


@cli.one_line_errors
def main(argv=None):
    """CLI entry point: flags checked before TensorFlow loads; one-line errors (exit 2) for bad input."""
    args = build_parser().parse_args(argv)
    out = pathlib.Path(args.out)
    cli.refuse_existing(out, args.overwrite)
    if args.labelled_fraction is not None and not 0.0 < args.labelled_fraction < 1.0:
        raise cli.FlagError(f"--labelled-fraction must be in (0, 1). Received: {args.labelled_fraction}")
    cli.import_tensorflow(args.verbose)
    import numpy as np

    from bcs_tf.data import labelled_split, load_dataset, read_npz
    from bcs_tf.errors import DataError
    from bcs_run.config import load_finished_run

    cfg, model = load_finished_run(args.run_dir)
    extra = {}
    if args.pool:
        (x,) = read_npz(args.pool, ("x",), "the --pool file")
        x = x.astype(np.float32)
    else:
        fraction = cfg.labelled_fraction if args.labelled_fraction is None else args.labelled_fraction
        data = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
        _, (x, y_true) = labelled_split(data.x_train, data.y_train, fraction)
        if not len(x):
            raise cli.FlagError(f"--labelled-fraction {fraction} leaves no unlabelled pool")
        extra["y_true"] = y_true
    if tuple(x.shape[1:]) != tuple(model.input_shape[1:]):
        raise DataError(f"pool images have shape {x.shape[1:]}, the model takes {model.input_shape[1:]}")
    y = pseudo_label(model, x)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x=x, y=y, **extra)
    quality = f", pseudo-label accuracy {np.mean(y == extra['y_true']):.4f}" if "y_true" in extra else ""
    print(f"wrote {len(x)} pseudo-labelled examples to {out}{quality}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
