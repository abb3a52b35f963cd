"""Names and paths of ``python -m export`` that the command line needs before TensorFlow loads."""

import pathlib

FORMATS = ("keras", "tflite", "onnx", "micro")
MICRO_FILES = ("model_data.h", "model_data.cc", "model_ops.h")  # beside the .tflite of --format micro
QUANTIZE = ("none", "dynamic", "float16", "int8")
NEEDS_TFLM = ("--format micro needs the TFLite Micro interpreter: pip install tflite-micro pyyaml (or the project's "
              "[micro] extra)")


def default_out(run_dir, fmt, quantize):
    """RUN_DIR/export/model[_QUANT].EXT (micro: RUN_DIR/export/micro/model_int8.tflite)."""
    if fmt == "micro":
        return pathlib.Path(run_dir) / "export" / "micro" / "model_int8.tflite"
    suffix = {"keras": ".keras", "tflite": ".tflite", "onnx": ".onnx"}[fmt]
    name = "model" + (f"_{quantize}" if fmt == "tflite" and quantize != "none" else "") + suffix
    return pathlib.Path(run_dir) / "export" / name
