"""Exported file size against its floor, for every format and quantisation (not a test).

Floor = nonzero kernel values at their width + uint16 CSR indices (2 bytes per nonzero) + the dense
parameters (biases, BatchNorm). Models are freshly initialised with random masks at each connectivity (as a
trained model's masks are unstructured too). Targets: 99%-sparse ``.tflite`` ≤ 1.3× floor, sparse ONNX ≤ 2×.
"before" is the stock converter's file (tflite) or the dense-initializer file (onnx) for the same model.

    python -m bench.export_size [--models small_cnn,vgg16] [--connectivities 1.0,0.1,0.01]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from bcs_tf.models import MODELS, build_model  # noqa: E402
from export import onnx_export, tflite, verify  # noqa: E402
from export.strip import kernel_nonzeros, strip_model  # noqa: E402
from bcs_run import cli  # noqa: E402


def sizes_for(model_name, connectivity, calibration=32):
    """Rows (format, quantize, bytes, floor, ratio, storage, loads) for one model at one connectivity."""
    net, alloc = build_model(model_name, "bcs", connectivity)
    plain = strip_model(net)
    nnz = sum(kernel_nonzeros(plain).values())
    dense_params = verify.dense_parameter_count(plain)
    rng = np.random.default_rng(0)
    shape = MODELS[model_name].input_shape
    calib = rng.uniform(size=(calibration,) + shape).astype("float32")
    rows = []
    for quantize in tflite.QUANTIZE:
        data, info = tflite.export_tflite(plain, quantize, calib, calib[:1], sparse=alloc is not None)
        number_format = {"none": "float32"}.get(quantize, quantize)
        size = verify.size_report(data, nnz, dense_params, number_format)
        storage = "sparse" if info["sparse_storage"] else "dense"
        stock = None
        if info["sparse_storage"]:  # the stock converter's file, same settings, for comparison
            stock = len(tflite.convert(plain, quantize, True, calib, info.get("int8_weights", "per-channel"),
                                       compacted=False)[0])
        if quantize == "int8":
            storage += f", {info['int8_weights']}"
        rows.append(("tflite", quantize, size["bytes"], size["floor_bytes"], size["over_floor"], storage,
                     info["loads"]["default"] == "ok", stock))
    proto = onnx_export.to_onnx(plain)
    dense_bytes = len(proto.SerializeToString())
    size = verify.size_report(proto.SerializeToString(), nnz, dense_params, "float32")
    rows.append(("onnx", "dense init", dense_bytes, size["floor_bytes"], dense_bytes / size["floor_bytes"],
                 "dense", True, None))
    if alloc is not None:
        proto, _ = onnx_export.sparsify(proto)
        data = proto.SerializeToString()
        onnx_export.session(data)  # must load in onnxruntime
        size = verify.size_report(data, nnz, dense_params, "float32")
        rows.append(("onnx", "sparse init", size["bytes"], size["floor_bytes"], size["over_floor"], "sparse", True,
                     dense_bytes))
    return nnz, rows


@cli.one_line_errors
def main(argv=None):
    """Print one table row per model × connectivity × format × quantisation."""
    p = cli.parser("python -m bench.export_size", __doc__)
    p.add_argument("--models", default="small_cnn,vgg16", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--connectivities", default="1.0,0.1,0.01", help="comma-separated connectivities in (0, 1]")
    args = p.parse_args(argv)
    print("| model | c | nonzeros | format | quantize | storage | KiB | floor KiB | size/floor | loads (default) "
          "| before KiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        for c in (float(v) for v in args.connectivities.split(",")):
            nnz, rows = sizes_for(model_name, c)
            for fmt, quantize, size, floor, ratio, storage, loads, before in rows:
                before = f"{before / 1024:,.1f}" if before else "–"
                print(f"| {model_name} | {c} | {nnz:,} | {fmt} | {quantize} | {storage} | {size / 1024:,.1f} | "
                      f"{floor / 1024:,.1f} | {ratio:.2f} | {'yes' if loads else 'NO'} | {before} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
