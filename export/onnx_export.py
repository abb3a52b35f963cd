"""Stripped Keras model → ONNX (tf2onnx from a ``tf.function``), pruned kernels as sparse initializers.

tf2onnx converts a ``tf.function`` with an explicit input signature (batch dimension free) at an opset
onnxruntime runs; Keras 3's ``model.export(format="onnx")`` needs the model to have been called and gives no
opset control, so we call tf2onnx directly. Converters store pruned kernels dense; :func:`sparsify`
rewrites every mostly-zero initializer as an ONNX ``sparse_initializer`` (values + int64 linear indices:
the checker rejects int32 indices), which onnxruntime densifies at load with identical outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import tensorflow as tf
from onnx import numpy_helper

OPSET = 17
INDEX_BYTES = 8  # int64 linear indices


def to_onnx(model, opset=OPSET):
    """ONNX ModelProto of a plain Keras ``model`` (input ``image``, batch dimension free)."""
    import tf2onnx  # imported lazily: it is slow to import and only the ONNX path needs it

    spec = (tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def forward(image):
        return model(image, training=False)

    proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=opset)
    return proto


def sparsify(proto, min_size=64):
    """Move initializers whose sparse form is smaller (density < 1/3 for float32) to sparse_initializer."""
    graph = proto.graph
    keep, moved = [], 0
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        nnz = int(np.count_nonzero(array))
        if (array.dtype.kind != "f" or array.size < min_size
                or nnz * (array.itemsize + INDEX_BYTES) >= array.size * array.itemsize):
            keep.append(init)
            continue
        flat = array.reshape(-1)
        idx = np.flatnonzero(flat).astype(np.int64)
        values = numpy_helper.from_array(flat[idx], name=init.name)
        indices = numpy_helper.from_array(idx, name=init.name + "_indices")
        graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(array.shape)))
        moved += 1
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(proto)  # the structural check; onnxruntime is the real validation
    return proto, moved


def kernel_nonzeros(proto):
    """Nonzero count of every Conv weight / MatMul-Gemm matrix initializer (dense or sparse)."""
    consumers = {}
    for node in proto.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            consumers[node.input[1]] = node.op_type
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            consumers[node.input[1]] = node.op_type
    total = 0
    for init in proto.graph.initializer:
        if init.name in consumers:
            total += int(np.count_nonzero(numpy_helper.to_array(init)))
    for sparse in proto.graph.sparse_initializer:
        if sparse.values.name in consumers:
            total += int(np.count_nonzero(numpy_helper.to_array(sparse.values)))
    return total


def session(data):
    """An onnxruntime CPU session for serialized ONNX ``data``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(sess, x):
    """Logits of ``sess`` for the float batch ``x``."""
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]
