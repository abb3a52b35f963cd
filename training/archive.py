"""``python -m training.archive RUN_DIR [--out FILE]``: a finished run's network as one small lossless file.

Writes ``RUN_DIR/network.npz`` (bcs_tf.archive: the architecture, the run's config and every variable, sparse
kernels as indices and values; ≈ 45 KB for a 99%-sparse small_cnn). ``training.evaluate`` and ``export`` accept a
directory that holds only it, so a results directory can keep every network behind its numbers and any cell
can be attacked again without retraining; ``training.reproduce`` archives each run it collects. Given such a
directory and ``--overwrite``, it rewrites the archive from itself in today's form (e.g. an older channel-granular
archive that stored its dormant channels' weights).
"""

from __future__ import annotations

import pathlib
import sys

from bcs_run import cli
from bcs_run.rundir import RunDir


def build_parser():
    """The ``training.archive`` parser."""
    p = cli.parser("python -m training.archive", __doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `python -m training.run` (or one "
                   "holding only its network.npz)")
    p.add_argument("--out", metavar="FILE", default=None, help="archive path (default: RUN_DIR/network.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing archive")
    cli.add_weights(p)
    cli.add_verbose(p)
    return p


@cli.one_line_errors
def main(argv=None):
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    run_dir = pathlib.Path(args.run_dir)
    if RunDir(run_dir).network() is None:
        raise cli.FlagError(f"{run_dir} has no model.keras or network.npz (is it a finished `training.run` output?)")
    cli.check_weights(args, run_dir)
    out = pathlib.Path(args.out) if args.out else RunDir(run_dir).archive
    if args.weights == "last" and not args.out:
        raise cli.FlagError("--weights last: pass --out (RUN_DIR/network.npz stays the selected network)")
    cli.refuse_existing(out, args.overwrite)
    cli.import_tensorflow(args.verbose)
    import keras
    import numpy as np

    from bcs_tf.archive import load_archive, save_archive
    from bcs_run.config import load_finished_run

    cfg, model = load_finished_run(run_dir)
    size = save_archive(model, out, {"config": cfg.to_dict(), **cli.load_weights(args, run_dir, model)})
    _, loaded = load_archive(out)  # the archive must compute exactly what model.keras computes
    probe = np.random.default_rng(0).uniform(0, 1, (4, *model.input_shape[1:])).astype(np.float32)
    if not np.array_equal(keras.ops.convert_to_numpy(model(probe)), keras.ops.convert_to_numpy(loaded(probe))):
        out.unlink()
        raise cli.FlagError(f"the archive of {run_dir} does not reproduce its logits; nothing written")
    print(f"wrote {out} ({size / 1024:.1f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
