"""Compact storage of sparse weights in a LiteRT (``.tflite``) flatbuffer.

The stock converter with ``EXPERIMENTAL_SPARSITY`` stores fully-connected weights in 1×4 blocks (for its
block-sparse FC kernel): at 99% unstructured sparsity almost every stored block holds a single nonzero, so
the weights take ~4× their nonzero size. :func:`compact` re-encodes every such tensor as plain CSR (1×1,
narrowest index type), feeding its consumer through a ``DENSIFY`` op exactly as the converter does for
convolutions, when that is smaller; and it shortens internal tensor names (signature names are kept).
Weight values are moved, never recomputed; outputs agree to float rounding (the FC kernel changes).
"""

from __future__ import annotations

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

_DTYPES = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16,
           schema.TensorType.INT8: np.int8, schema.TensorType.UINT8: np.uint8,
           schema.TensorType.INT32: np.int32}


def _index_values(vector):
    return np.asarray(vector.values, dtype=np.int64) if vector is not None and vector.values is not None else None


def decode_sparse(tensor, buffer_bytes):
    """Dense numpy array of a tensor stored in the TFLite sparsity format (any traversal order / blocks)."""
    sp = tensor.sparsity
    values = np.frombuffer(bytes(buffer_bytes), dtype=_DTYPES[tensor.type])
    order = list(sp.traversalOrder)
    block_map = list(sp.blockMap) if sp.blockMap is not None else []
    shape = [int(d) for d in tensor.shape]
    # Walk the levels: `pos` is the position in the current level, `coords` the traversed coordinates.
    pos = np.zeros(1, dtype=np.int64)
    coords = np.zeros((1, 0), dtype=np.int64)
    for meta in sp.dimMetadata:
        if meta.format == schema.DimensionType.DENSE:
            n = int(meta.denseSize)
            child = np.arange(n, dtype=np.int64)
            pos_new = (pos[:, None] * n + child[None, :]).reshape(-1)
            coord = np.tile(child, len(pos))
            coords = np.repeat(coords, n, axis=0)
        else:
            segments = _index_values(meta.arraySegments)
            indices = _index_values(meta.arrayIndices)
            starts, ends = segments[pos], segments[pos + 1]
            counts = ends - starts
            pos_new = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(pos) else pos
            pos_new = pos_new.astype(np.int64)
            coord = indices[pos_new]
            coords = np.repeat(coords, counts, axis=0)
        coords = np.concatenate([coords, coord[:, None]], axis=1)
        pos = pos_new
    dense = np.zeros(shape, dtype=values.dtype)
    full = np.zeros((len(pos), len(shape)), dtype=np.int64)
    n_dims = len(shape)
    block_sizes = {}  # original dim -> block size, for the block levels after the first n_dims levels
    for level in range(n_dims, len(order)):
        block_sizes[block_map[order[level] - n_dims]] = int(sp.dimMetadata[level].denseSize)
    for level, dim in enumerate(order):
        if level < n_dims:
            full[:, dim] += coords[:, level] * block_sizes.get(dim, 1)
        else:
            full[:, block_map[dim - n_dims]] += coords[:, level]
    dense[tuple(full.T)] = values[pos]
    return dense


def _vector(values):
    """Narrowest TFLite index vector (uint8 / uint16 / int32) holding ``values``."""
    top = int(values.max()) if len(values) else 0
    if top < 256:
        vec, kind = schema.Uint8VectorT(), schema.SparseIndexVector.Uint8Vector
    elif top < 65536:
        vec, kind = schema.Uint16VectorT(), schema.SparseIndexVector.Uint16Vector
    else:
        vec, kind = schema.Int32VectorT(), schema.SparseIndexVector.Int32Vector
    vec.values = [int(v) for v in values]
    return vec, kind


def encode_csr(dense):
    """(SparsityParametersT, value bytes): all dimensions dense except the last, which is CSR."""
    rows = dense.reshape(-1, dense.shape[-1])
    nz_rows, nz_cols = np.nonzero(rows)
    segments = np.concatenate([[0], np.cumsum(np.bincount(nz_rows, minlength=rows.shape[0]))])
    sp = schema.SparsityParametersT()
    sp.traversalOrder = list(range(dense.ndim))
    sp.blockMap = []
    sp.dimMetadata = []
    for d in range(dense.ndim - 1):
        meta = schema.DimensionMetadataT()
        meta.format, meta.denseSize = schema.DimensionType.DENSE, int(dense.shape[d])
        sp.dimMetadata.append(meta)
    meta = schema.DimensionMetadataT()
    meta.format = schema.DimensionType.SPARSE_CSR
    meta.arraySegments, meta.arraySegmentsType = _vector(segments)
    meta.arrayIndices, meta.arrayIndicesType = _vector(nz_cols)
    sp.dimMetadata.append(meta)
    return sp, rows[nz_rows, nz_cols].tobytes()


def _sparse_bytes(sp, n_values_bytes):
    width = {schema.SparseIndexVector.Uint8Vector: 1, schema.SparseIndexVector.Uint16Vector: 2,
             schema.SparseIndexVector.Int32Vector: 4}
    total = n_values_bytes
    for meta in sp.dimMetadata:
        if meta.format == schema.DimensionType.SPARSE_CSR:
            total += width[meta.arraySegmentsType] * len(meta.arraySegments.values)
            total += width[meta.arrayIndicesType] * len(meta.arrayIndices.values)
    return total


def _opcode_index(model, builtin):
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def compact(model_bytes):
    """Return ``(bytes, notes)``: the model with block-sparse weights re-encoded as CSR and short names."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    notes = []
    densify = None
    for sg in model.subgraphs:
        keep = set(sg.inputs) | set(sg.outputs)
        new_ops = []
        for op in sg.operators:
            for slot, t_index in enumerate(op.inputs):
                t = sg.tensors[t_index] if t_index >= 0 else None
                block_map = t.sparsity.blockMap if t is not None and t.sparsity is not None else None
                if block_map is None or not len(block_map):
                    continue
                buf = model.buffers[t.buffer]
                dense = decode_sparse(t, buf.data)
                sp, values = encode_csr(dense)
                old_bytes = _sparse_bytes(t.sparsity, len(buf.data))
                if _sparse_bytes(sp, len(values)) >= old_bytes:
                    continue
                t.sparsity, buf.data = sp, np.frombuffer(values, dtype=np.uint8)
                out = schema.TensorT()
                out.shape, out.type, out.name = list(t.shape), t.type, t.name + b"/densified"
                out.buffer = len(model.buffers)
                model.buffers.append(schema.BufferT())
                sg.tensors.append(out)
                if densify is None:
                    densify = _opcode_index(model, schema.BuiltinOperator.DENSIFY)
                dop = schema.OperatorT()
                dop.opcodeIndex, dop.inputs, dop.outputs = densify, [t_index], [len(sg.tensors) - 1]
                new_ops.append(dop)
                op.inputs[slot] = len(sg.tensors) - 1
                notes.append(f"re-encoded {int(np.count_nonzero(dense))}-nonzero block-sparse weight as CSR "
                             f"({old_bytes} -> {_sparse_bytes(sp, len(values))} bytes)")
            new_ops.append(op)
        sg.operators = new_ops
        for op in sg.operators:  # the stored sparse constant needs no second copy of the channel scales
            c = model.operatorCodes[op.opcodeIndex]
            if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.DENSIFY:
                src, dst = sg.tensors[op.inputs[0]], sg.tensors[op.outputs[0]]
                if src.quantization is not None and dst.quantization is None:
                    dst.quantization = src.quantization
                src.quantization = None
        for i, t in enumerate(sg.tensors):
            if i not in keep:
                t.name = b"t%d" % i
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), notes


def _tensor_array(model, tensor):
    buf = model.buffers[tensor.buffer]
    if buf.data is None or not len(buf.data):
        return None
    if tensor.sparsity is not None:
        return decode_sparse(tensor, buf.data)
    return np.frombuffer(bytes(buf.data), dtype=_DTYPES[tensor.type])


OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def op_code(model, op):
    """The builtin operator code of ``op`` (new and deprecated code fields)."""
    c = model.operatorCodes[op.opcodeIndex]
    return max(c.builtinCode, c.deprecatedBuiltinCode)


def stored_weight(model, producer, op):
    """``(stored weight tensor, codes of the DENSIFY / DEQUANTIZE ops between it and ``op``)``; ``producer``
    maps the subgraph's tensor indices to the ops that write them."""
    ops = schema.BuiltinOperator
    t_index, chain = int(op.inputs[1]), []
    while t_index in producer and op_code(model, producer[t_index]) in (ops.DENSIFY, ops.DEQUANTIZE):
        chain.append(op_code(model, producer[t_index]))
        t_index = int(producer[t_index].inputs[0])
    return t_index, chain


def _weighted_ops(model):
    """``(op code, stored weight tensor, codes of the ops between them)`` for every CONV_2D /
    DEPTHWISE_CONV_2D / FULLY_CONNECTED op; weight inputs produced by DENSIFY / DEQUANTIZE chains are followed
    back to their stored constant."""
    ops = schema.BuiltinOperator
    weighted = {ops.CONV_2D, ops.DEPTHWISE_CONV_2D, ops.FULLY_CONNECTED}
    for sg in model.subgraphs:
        producer = {int(o): op for op in sg.operators for o in op.outputs}
        for op in sg.operators:
            if op_code(model, op) in weighted:
                t_index, chain = stored_weight(model, producer, op)
                yield op_code(model, op), sg.tensors[t_index], chain


def kernel_nonzeros(model_bytes):
    """Nonzero count of the weights of every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op (at their stored
    constant, behind any DENSIFY / DEQUANTIZE)."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    total = 0
    for _, tensor, _ in _weighted_ops(model):
        array = _tensor_array(model, tensor)
        if array is not None:
            total += int(np.count_nonzero(array))
    return total


def weight_storage(model_bytes):
    """``[(op, storage)]`` for every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op: ``"sparse kernel"``
    when its weight tensor is stored sparse and fed to it directly (the op itself computes sparse), ``"densified"``
    when a DENSIFY op rebuilds the dense weights first (sparse storage, dense compute), ``"dense"`` otherwise."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    found = []
    for code, tensor, chain in _weighted_ops(model):
        if schema.BuiltinOperator.DENSIFY in chain:
            storage = "densified"
        else:
            storage = "sparse kernel" if tensor.sparsity is not None else "dense"
        found.append((OP_NAMES.get(code, str(code)), storage))
    return found
