"""Stripped Keras model → LiteRT flatbuffer, sparse storage, every quantisation mode, load-checked.

Each file is checked under the interpreter defaults (XNNPACK delegate) and under the reference kernels.
Where sparse storage of a mode cannot load (or computes differently from the reference kernels) with the
defaults (measured: dynamic-range int8 + sparsity, "failed to delegate CONV_2D"), the mode is converted again
without sparse storage and this is reported loudly, so no file handed out fails with the defaults unannounced.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from bcs_tf._keras_compat import set_per_tensor_int8
from bcs_tf.errors import ConfigError
from export.options import QUANTIZE
from export.tflite_sparse import compact
RESOLVERS = {"default": OpResolverType.AUTO, "reference": OpResolverType.BUILTIN_REF}


def convert(model, quantize="none", sparse=True, representative=None, int8_weights="per-channel", compacted=True):
    """Convert a plain Keras ``model``; ``representative`` (float array) is required for ``int8``.

    ``compacted=False`` returns the stock converter's output (for comparison in bench/export_size.py).
    """
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize must be one of {QUANTIZE}. Received: {quantize!r}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []
    if quantize != "none":
        optimizations.append(tf.lite.Optimize.DEFAULT)
    converter.optimizations = optimizations
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        if representative is None or not len(representative):
            raise ConfigError("int8 quantisation needs calibration examples (--calibration-examples > 0)")
        converter.representative_dataset = lambda: ([x[None]] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Per-channel scales cost 12 bytes per output channel (float32 scale + int64 zero point, for the weights
        # and again for the int32 biases), a third of a 99%-sparse file; per-tensor ones zero small weights.
        set_per_tensor_int8(converter, int8_weights == "per-tensor")
    data = converter.convert()
    notes = []
    if sparse and compacted:
        data, notes = compact(data)
    return data, notes


def interpreter(data, resolver="default", batch=None):
    """A ready interpreter for ``data`` (optionally resized to ``batch`` examples)."""
    it = Interpreter(model_content=data, experimental_op_resolver_type=RESOLVERS[resolver])
    if batch is not None:
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], [batch] + list(inp["shape"][1:]))
    it.allocate_tensors()
    return it


def run(it, x):
    """Logits of interpreter ``it`` for the float batch ``x`` (quantised inputs handled)."""
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    if tuple(inp["shape"]) != tuple(x.shape):
        it.resize_tensor_input(inp["index"], list(x.shape))
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale + zero), np.iinfo(inp["dtype"]).min, np.iinfo(inp["dtype"]).max)
    it.set_tensor(inp["index"], x.astype(inp["dtype"]))
    it.invoke()
    y = it.get_tensor(out["index"])
    if out["dtype"] != np.float32:
        scale, zero = out["quantization"]
        y = (y.astype(np.float32) - zero) * scale
    return y


def load_check(data, sample):
    """Per resolver ('default' = XNNPACK, 'reference'): 'ok' or the error, for one run on ``sample``.

    A file that loads under the defaults but disagrees with the reference kernels (seen here: int8 weights
    dequantised after DENSIFY) counts as failing under the defaults: it must never be handed out silently.
    """
    result, outputs = {}, {}
    for name in RESOLVERS:
        try:
            outputs[name] = run(interpreter(data, name), sample)
            result[name] = "ok"
        except Exception as exc:  # LiteRT raises RuntimeError / ValueError with the delegate's message
            result[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if len(outputs) == 2:
        ref, got = outputs["reference"], outputs["default"]
        if np.max(np.abs(ref - got)) > 0.1 * np.max(np.abs(ref)) + 1e-3:
            result["default"] = (f"wrong results: default kernels differ from reference by "
                                 f"{float(np.max(np.abs(ref - got))):.3g}")
    return result


def export_tflite(model, quantize, representative, sample, sparse=True, int8_weights=None):
    """Convert with load checks and the dense-storage fallback; returns ``(bytes, info dict)``.

    ``int8_weights`` (``per-channel``, the default, or ``per-tensor``): per-tensor scales round a layer's
    smallest weights (e.g. freshly re-activated connections) to zero, so per-channel ones are used unless asked
    otherwise, although their scales take a large share of a 99%-sparse file; the export counts (and bounds,
    ``--max-zeroed``) the connections int8 still rounds to zero.
    """
    int8_weights = int8_weights or "per-channel"
    data, notes = convert(model, quantize, sparse, representative, int8_weights)
    loads = load_check(data, sample)
    info = {"quantize": quantize, "sparse_storage": sparse, "loads": loads, "notes": notes, "warnings": []}
    if quantize == "int8":
        info["int8_weights"] = int8_weights
    if sparse and loads["default"] != "ok":
        dense_data, _ = convert(model, quantize, False, representative, int8_weights)
        dense_loads = load_check(dense_data, sample)
        info["warnings"].append(
            f"sparse storage with quantize={quantize} fails to load under the default LiteRT delegates "
            f"({loads['default']}); wrote the dense-storage conversion instead (loads: {dense_loads['default']})")
        info.update(sparse_storage=False, loads=dense_loads, sparse_attempt_loads=loads)
        data = dense_data
    if info["loads"]["default"] != "ok":
        info["warnings"].append(f"this file does NOT load with the default LiteRT interpreter: "
                                f"{info['loads']['default']}")
    return data, info
