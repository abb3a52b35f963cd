"""``python -m export RUN_DIR --format {keras,tflite,onnx,micro}``: deployable files from a training run, verified.

Every export is checked before anything is written (parity with the Keras model on test data, exact
connection count, size against its floor, robustness of the exported model to PGD examples crafted against the
Keras model, single-example latency); results go to ``export_report.json`` beside the file and a short table.
``--format micro`` writes a full-integer int8 file for TensorFlow Lite Micro with ``model_data.h`` /
``model_data.cc`` (the C array) and ``model_ops.h`` (the op resolver), measured on the TFLM interpreter.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

from export.options import FORMATS, MICRO_FILES, NEEDS_TFLM, QUANTIZE, default_out
from bcs_run import cli
from bcs_run.config import finished_network


def build_parser():
    """The ``python -m export`` parser."""
    p = cli.parser("python -m export", __doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `python -m training.run`")
    fmt = p.add_argument_group("format")
    fmt.add_argument("--format", choices=FORMATS, required=True,
                     help="keras: stripped Keras model; tflite: LiteRT flatbuffer; onnx: ONNX (opset 17); micro: "
                     "full-integer int8 for TensorFlow Lite Micro with its C array and op resolver (needs the "
                     "tflite-micro package)")
    fmt.add_argument("--quantize", choices=QUANTIZE, default="none", help="LiteRT number format (tflite only)")
    fmt.add_argument("--int8-weights", choices=("per-channel", "per-tensor"),
                     help="int8 weight scales of --quantize int8 (default: per-channel, which rounds fewer small "
                     "weights to zero; --format micro is always per-channel)")
    fmt.add_argument("--max-zeroed", type=cli.share(), metavar="F", default=0.01,
                     help="int8 exports (--quantize int8, --format micro) refuse when more than this share of the "
                     "trained connections would round to zero")
    fmt.add_argument("--onnx-dense", action="store_true", help="keep pruned ONNX initializers dense")
    data = p.add_argument_group("data")
    data.add_argument("--calibration-examples", type=cli.positive(int, 0), metavar="N", default=200,
                      help="training images for int8 calibration")
    data.add_argument("--n-examples", type=cli.positive(int), metavar="N", default=None,
                      help="test images used for verification (default: 2000, or the whole test set if smaller)")
    attack = p.add_argument_group("attack")
    attack.add_argument("--attack-exported", action="store_true",
                        help="also attack the exported file itself: ART's Square (L∞, the run's ε, score-based) "
                        "through a black-box wrapper of the LiteRT interpreter / onnxruntime session")
    attack.add_argument("--attack-examples", type=cli.positive(int), metavar="N", default=500,
                        help="test images Square attacks (the first N of the verification images)")
    attack.add_argument("--attack-queries", type=cli.positive(int), metavar="N", default=1000,
                        help="Square's query budget per image")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="FILE", help="output file (default: RUN_DIR/export/model[_QUANT].EXT)")
    out.add_argument("--allow-mismatch", action="store_true", help="write even if parity fails (loudly)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    cli.add_verbose(out)
    return p


def parse_args(argv=None):
    """Command-line options, checked without TensorFlow."""
    args = build_parser().parse_args(argv)
    if args.quantize != "none" and args.format != "tflite":
        raise cli.FlagError(f"--quantize applies to --format tflite only (micro is always int8). Received: "
                            f"--format {args.format} --quantize {args.quantize}")
    if args.format == "micro" and importlib.util.find_spec("tflite_micro") is None:
        raise cli.FlagError(NEEDS_TFLM)
    if finished_network(args.run_dir) is None:
        raise cli.FlagError(f"{args.run_dir} has no model.keras or network.npz (is it a finished `training.run` "
                            "output or an archived run of a results directory?)")
    out = pathlib.Path(args.out) if args.out else default_out(args.run_dir, args.format, args.quantize)
    taken = [out] + ([out.parent / name for name in MICRO_FILES] if args.format == "micro" else [])
    cli.refuse_existing(taken, args.overwrite)
    return args


def print_table(r):
    """Short human-readable summary of one report entry."""
    rob, size, nz = r["robustness"], r["size"], r["nonzeros"]
    rows = [
        ("file", f"{r['file']} ({r.get('runtime', 'keras')})"),
        ("size", f"{size['bytes']:,} B (gzip {size['gzip_bytes']:,} B), {size['over_floor']:.2f}x floor "
                 f"{size['floor_bytes']:,} B"),
        ("nonzero weights", f"{nz['exported']:,} exported / {nz['keras_stripped']:,} stripped / budget "
                            + (f"{nz['budget']:,} connections ({nz.get('granularity', 'weight')})"
                               if nz["budget"] is not None else "dense")),
        ("parity", f"top-1 agreement {r['parity']['top1_agreement']:.4f}, max |dlogit| "
                   f"{r['parity']['max_abs_diff']:.3g} on {r['parity']['n']} test images"),
        ("clean acc", f"exported {rob['exported']['clean']:.4f} | keras {rob['keras']['clean']:.4f}"),
        ("PGD-20 acc", f"exported (transfer) {rob['exported']['pgd20_transfer']:.4f} | keras "
                       f"{rob['keras']['pgd20']:.4f} (eps {rob['eps']})"),
        *([("Square acc", f"exported {rob['square']['exported']:.4f} | keras {rob['square']['keras']:.4f} "
                          f"({rob['square']['queries']} queries, {rob['square']['n']} images, black-box)")]
          if "square" in rob else []),
        ("latency", f"{r['latency_ms']['median_single_example']:.3f} ms / example (keras "
                    f"{r['latency_ms']['keras_median_single_example']:.3f} ms)"),
    ]
    if "micro" in r:
        m = r["micro"]
        rows += [("flash", f"{m['flash_bytes']:,} B (the flatbuffer; model_data.cc holds it as a C array)"),
                 ("tensor arena", f"{m['arena']['smallest_bytes']:,} B smallest on the TFLM interpreter, "
                                  f"{m['arena']['recommended_bytes']:,} B recommended (+{m['arena']['margin']:.0%})"),
                 ("ops", ", ".join(m["ops"])),
                 ("input", f"int8, scale {m['input_scale']:.6g}, zero point {m['input_zero_point']}")]
    if "loads" in r:
        rows.append(("loads", ", ".join(f"{k}: {v}" for k, v in r["loads"].items())))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for warning in r.get("warnings", []):
        print(f"\n*** WARNING: {warning} ***", file=sys.stderr)


@cli.one_line_errors
def main(argv=None):
    """CLI entry point: flags checked before TensorFlow loads; one-line errors (exit 2) for bad input or failed
    checks."""
    args = parse_args(argv)
    cli.import_tensorflow(args.verbose)
    from export.pipeline import export

    print_table(export(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
