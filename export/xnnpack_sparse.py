"""Would XNNPACK's sparse inference run this ``.tflite`` file? Its rules (the XNNPACK delegate README in
TensorFlow, "Sparse Inference"), checked on the flatbuffer:

- the sparse subgraph starts with a 3×3 stride-2 CONV_2D with padding 1 on every side and 3 input channels
  (TensorFlow's SAME pads 0/1 at stride 2 on even inputs; an explicit PAD of 1 followed by VALID qualifies,
  XNNPACK fuses it) and ends with a spatial MEAN;
- between them only 1×1 stride-1 CONV_2D without padding, 3×3 / 5×5 DEPTHWISE_CONV_2D (padding 1 / 2), ADD,
  MUL, PAD into those, and elementwise activations;
- weights are stored sparse (DENSIFY), and at least 2/3 of the 1×1 convolutions' weights are zero.

XNNPACK also requires the CPU: it switches sparse inference off on x86 processors with AVX ("dense inference is
expected to be faster", ``xnn_is_chw_compatible_config``), so on such machines an eligible file runs dense.
"""

from __future__ import annotations

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from export.tflite_sparse import OP_NAMES, _tensor_array, op_code, stored_weight

OPS = schema.BuiltinOperator
ELEMENTWISE = {OPS.RELU, OPS.RELU6, OPS.RELU_N1_TO_1, OPS.LOGISTIC, OPS.HARD_SWISH, OPS.LEAKY_RELU, OPS.ABS,
               OPS.NEG, OPS.ELU, OPS.FLOOR, OPS.CEIL, OPS.ROUND, OPS.SQUARE, OPS.ADD, OPS.MUL, OPS.DENSIFY}


def cpu_runs_sparse_inference():
    """False on x86 CPUs with AVX, where XNNPACK turns sparse inference off; True elsewhere."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return not (" avx" in flags and ("GenuineIntel" in flags or "AuthenticAMD" in flags))


def _pads(model, sg, op):
    """Paddings ``[[top, bottom], [left, right]]`` of a PAD op (None when not constant)."""
    array = _tensor_array(model, sg.tensors[int(op.inputs[1])])
    return None if array is None else np.asarray(array).reshape(-1, 2)[1:3].tolist()


def check(model_bytes):
    """``{"eligible": bool, "reasons": [why not], "zero_fraction_1x1": float or None}`` for the main subgraph."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    sg = model.subgraphs[0]
    producer = {int(o): op for op in sg.operators for o in op.outputs}
    reasons, zeros, total, stem, mean, sparse_weights = [], 0, 0, None, None, False

    def weight(op):
        nonlocal sparse_weights
        t, chain = stored_weight(model, producer, op)
        sparse_weights |= OPS.DENSIFY in chain
        tensor = sg.tensors[t]
        return tensor, _tensor_array(model, tensor)

    def padding_of(op, options_padding):
        """Explicit (top, bottom, left, right) padding of a conv, following a PAD in front of it."""
        x = int(op.inputs[0])
        if options_padding == schema.Padding.VALID and x in producer and op_code(model, producer[x]) == OPS.PAD:
            pads = _pads(model, sg, producer[x])
            return None if pads is None else (pads[0][0], pads[0][1], pads[1][0], pads[1][1])
        return "SAME" if options_padding == schema.Padding.SAME else (0, 0, 0, 0)

    for op in sg.operators:
        code = op_code(model, op)
        if code == OPS.CONV_2D:
            tensor, array = weight(op)
            out_c, kh, kw, in_c = [int(d) for d in tensor.shape]
            opts = op.builtinOptions  # Conv2DOptionsT: flatbuffer_utils reads the object API
            stride, pad = (opts.strideH, opts.strideW), padding_of(op, opts.padding)
            if stem is None:
                stem = (kh, kw, stride, pad, in_c)
                if (kh, kw) != (3, 3) or stride != (2, 2) or pad != (1, 1, 1, 1) or in_c != 3:
                    reasons.append(f"the first convolution is {kh}×{kw}, stride {stride[0]}, padding {pad}, "
                                   f"{in_c} input channels (needs 3×3, stride 2, padding 1 on every side, 3)")
            elif mean is None:
                if (kh, kw) != (1, 1) or stride != (1, 1):
                    reasons.append(f"a {kh}×{kw} stride-{stride[0]} CONV_2D inside the subgraph (only 1×1 stride 1)")
                elif array is not None:
                    zeros, total = zeros + int(np.sum(array == 0)), total + array.size
        elif code == OPS.MEAN and stem is not None and mean is None:
            mean = op
        elif stem is not None and mean is None and code not in ELEMENTWISE | {OPS.DEPTHWISE_CONV_2D, OPS.PAD}:
            reasons.append(f"{OP_NAMES.get(code, str(code))} inside the subgraph")
    if stem is None:
        reasons.append("no convolution to start from")
    if mean is None:
        reasons.append("no spatial MEAN at the end")
    fraction = zeros / total if total else None
    if fraction is None:
        reasons.append("no 1×1 convolution")
    elif fraction < 2 / 3:
        reasons.append(f"only {fraction:.0%} of the 1×1 weights are zero (needs ≥ 67%)")
    if not sparse_weights:
        reasons.append("weights are stored dense (no DENSIFY)")
    return {"eligible": not reasons, "reasons": list(dict.fromkeys(reasons)), "zero_fraction_1x1": fraction}
