"""Microcontroller export: a full-integer int8 flatbuffer for TensorFlow Lite Micro (TFLM), the C array and the
op resolver that firmware compiles in, and the measurements only the TFLM runtime can give (smallest tensor
arena, agreement and robustness on the TFLM interpreter itself).

TFLM has no sparse tensor format: every weight is stored and computed as a dense int8, so unstructured sparsity
buys no flash here; channel granularity does, because the export compacts the gated channels away first.
The TFLM interpreter is the ``tflite-micro`` package (an x86 build of the runtime with its reference kernels),
an optional extra.
"""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from tensorflow.lite.tools import flatbuffer_utils

from bcs_tf.errors import ConfigError
from export.options import NEEDS_TFLM
from export.tflite_sparse import OP_NAMES, op_code

ARENA_MARGIN = 0.10  # the recommended arena: the smallest measured one plus this share, rounded up to 16 bytes
ARENA_LIMIT = 1 << 28  # the search gives up above 256 MiB
ALIGN = 16

# One TFLM interpreter per process: an arena too small for a model can crash it (seen: a segfault below the
# model's tail allocations), so every probe of the search runs in a child process.
_PROBE = """
import sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
it = runtime.Interpreter.from_bytes(open(sys.argv[1], 'rb').read(), arena_size=int(sys.argv[2]))
detail = it.get_input_details(0)
it.set_input(np.zeros(tuple(detail['shape']), detail['dtype']), 0)
it.invoke()
print('ok')
"""


def require_tflm():
    """The TFLM Python runtime module; ConfigError naming the package when it is not installed."""
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:
        raise ConfigError(NEEDS_TFLM) from None
    return runtime


def convert(model, representative):
    """Full-integer int8 flatbuffer of the plain Keras ``model``: int8 input and output, per-channel int8
    weights (the converter's default, which TFLM's CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED support),
    calibrated on ``representative`` (float training images), dense storage, batch 1."""
    if representative is None or not len(representative):
        raise ConfigError("--format micro needs calibration examples (--calibration-examples > 0)")
    # batch 1, fixed: a board runs one example at a time, and a static shape spares the SHAPE / STRIDED_SLICE /
    # PACK ops a dynamic batch adds in front of every reshape
    inputs = keras.Input(batch_shape=(1, *model.input_shape[1:]))
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, model(inputs)))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None]] for x in representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def ops(data):
    """The builtin op names the flatbuffer ``data`` runs, in order of first use."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    names = []
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            name = OP_NAMES.get(op_code(model, op))
            if name is None:
                raise ConfigError(f"the model uses builtin operator {op_code(model, op)}, unknown to this converter")
            if name not in names:
                names.append(name)
    return names


def resolver_method(op):
    """``MicroMutableOpResolver``'s method for builtin ``op``: CONV_2D → AddConv2D, FULLY_CONNECTED →
    AddFullyConnected."""
    return "Add" + "".join(part if part[0].isdigit() else part.capitalize() for part in op.split("_"))


def arena_works(path, size):
    """Whether the TFLM interpreter loads ``path`` and runs one inference with an arena of ``size`` bytes."""
    result = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(size)], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.strip() == "ok"


def smallest_arena(data):
    """The smallest tensor arena (a multiple of 16 bytes) with which TFLM runs ``data``, by doubling and then
    bisection on the interpreter itself; ConfigError when none up to 256 MiB does."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.tflite"
        path.write_bytes(data)
        low, high = 0, 1024  # low fails (or is zero), high is tried next
        while not arena_works(path, high):
            low, high = high, high * 2
            if high > ARENA_LIMIT:
                raise ConfigError(f"TFLM could not run the model with any tensor arena up to {ARENA_LIMIT:,} bytes")
        while high - low > ALIGN:
            middle = (low + high) // 2 // ALIGN * ALIGN
            if middle <= low:
                break
            if arena_works(path, middle):
                high = middle
            else:
                low = middle
    return high


def recommended_arena(smallest, margin=ARENA_MARGIN):
    """``smallest`` plus ``margin`` (a share), rounded up to 16 bytes."""
    return int(math.ceil(smallest * (1 + margin) / ALIGN) * ALIGN)


class MicroRuntime:
    """The TFLM interpreter of an int8 model as a float function: batch in [0, 1] → float logits (inputs
    quantized with the model's input scale and zero point, outputs dequantized; one example per invoke, as on a
    board)."""

    def __init__(self, data, arena_size):
        runtime = require_tflm()
        self.interpreter = runtime.Interpreter.from_bytes(data, arena_size=arena_size)
        self.input, self.output = self.interpreter.get_input_details(0), self.interpreter.get_output_details(0)

    @staticmethod
    def _params(detail):
        q = detail["quantization_parameters"]
        return float(q["scales"][0]), int(q["zero_points"][0])

    def quantization(self):
        """The input's and output's int8 scale and zero point, as the firmware needs them."""
        (in_scale, in_zero), (out_scale, out_zero) = self._params(self.input), self._params(self.output)
        return {"input_scale": in_scale, "input_zero_point": in_zero, "output_scale": out_scale,
                "output_zero_point": out_zero}

    def quantize(self, x):
        """Float images → the int8 input tensor values."""
        scale, zero = self._params(self.input)
        return np.clip(np.round(np.asarray(x, np.float32) / scale + zero), -128, 127).astype(np.int8)

    def __call__(self, x):
        scale, zero = self._params(self.output)
        q = self.quantize(x)
        out = []
        for example in q:
            self.interpreter.set_input(example[None], 0)
            self.interpreter.invoke()
            out.append(self.interpreter.get_output(0)[0])
        return (np.stack(out).astype(np.float32) - zero) * scale


def c_sources(data, micro, name="g_model_data"):
    """``{"model_data.h": …, "model_data.cc": …}``: the model as a 16-byte-aligned ``const unsigned char``
    array with its length, and in the header the input/output scale and zero point and the arena size (from
    ``micro``, the export report's ``micro`` entry)."""
    in_scale, in_zero, arena = micro["input_scale"], micro["input_zero_point"], micro["arena"]
    out_scale, out_zero = micro["output_scale"], micro["output_zero_point"]
    header = f"""// Generated by `python -m export --format micro`: the int8 model for TensorFlow Lite Micro.
#ifndef BCS_TF_MODEL_DATA_H_
#define BCS_TF_MODEL_DATA_H_

extern const unsigned char {name}[];
extern const unsigned int {name}_len;

// Quantize a float input x (pixels in [0, 1]) as round(x / kInputScale) + kInputZeroPoint, clamped to int8;
// a logit is (q - kOutputZeroPoint) * kOutputScale.
constexpr float kInputScale = {in_scale!r}f;
constexpr int kInputZeroPoint = {in_zero};
constexpr float kOutputScale = {out_scale!r}f;
constexpr int kOutputZeroPoint = {out_zero};

// The smallest tensor arena measured on the x86 TFLM interpreter ({arena['smallest_bytes']} bytes) plus
// {round(100 * arena['margin'])}%; check it on the board (its kernels and alignment may need more).
constexpr int kTensorArenaSize = {arena['recommended_bytes']};

#endif  // BCS_TF_MODEL_DATA_H_
"""
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 12]) for i in range(0, len(data), 12)]
    source = (f'// Generated by `python -m export --format micro`.\n#include "model_data.h"\n\n'
              f"alignas({ALIGN}) const unsigned char {name}[] = {{\n    " + ",\n    ".join(rows) +
              f"\n}};\nconst unsigned int {name}_len = {len(data)};\n")
    return {"model_data.h": header, "model_data.cc": source}


def ops_header(op_names):
    """``model_ops.h``: a ``MicroMutableOpResolver`` sized for, and holding, exactly ``op_names``."""
    adds = "\n".join(f"  if (resolver.{resolver_method(op)}() != kTfLiteOk) return kTfLiteError;" for op in op_names)
    return f"""// Generated by `python -m export --format micro`: exactly the ops the model uses.
#ifndef BCS_TF_MODEL_OPS_H_
#define BCS_TF_MODEL_OPS_H_

#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

constexpr int kModelOpCount = {len(op_names)};  // {", ".join(op_names)}
using ModelOpResolver = tflite::MicroMutableOpResolver<kModelOpCount>;

inline TfLiteStatus RegisterModelOps(ModelOpResolver& resolver) {{
{adds}
  return kTfLiteOk;
}}

#endif  // BCS_TF_MODEL_OPS_H_
"""


def parse_c_array(source):
    """The bytes of the array in a ``model_data.cc`` (to check it against the flatbuffer)."""
    body = source[source.index("{") + 1:source.index("};")]
    return bytes(int(token, 16) for token in body.replace("\n", " ").split(",") if token.strip())
