"""Checks run after every export: parity, sparsity, size against its floor, latency (the robustness checks run
through ``bcs_tf.robustness``)."""

from __future__ import annotations

import gzip
import statistics
import time

import keras
import numpy as np

# Per exported number format: (max |Δlogit| allowed, min top-1 agreement with the Keras model).
PARITY_TOLERANCE = {"float32": (1e-3, 0.999), "float16": (5e-2, 0.99), "dynamic": (None, 0.97),
                    "int8": (None, 0.95)}
VALUE_BYTES = {"float32": 4, "float16": 2, "dynamic": 1, "int8": 1}


def size_report(data, nnz, dense_params, number_format):
    """File and gzip size, and the floor: nnz values at their width + uint16 indices + dense parameters."""
    dense_width = 2 if number_format == "float16" else 4
    floor = nnz * VALUE_BYTES[number_format] + 2 * nnz + dense_params * dense_width
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9)), "floor_bytes": floor,
            "over_floor": len(data) / floor if floor else None}


def dense_parameter_count(model):
    """Parameters of a stripped model outside conv / dense kernels (biases, BatchNorm)."""
    kernels = sum(int(np.prod(layer.kernel.shape)) for layer in model.layers
                  if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)))
    return model.count_params() - kernels


def parity(reference, exported, number_format):
    """Max |Δlogit| and top-1 agreement of ``exported`` against ``reference`` logits, with the verdict."""
    max_diff = float(np.max(np.abs(reference - exported)))
    agreement = float(np.mean(np.argmax(reference, 1) == np.argmax(exported, 1)))
    max_allowed, min_agree = PARITY_TOLERANCE[number_format]
    ok = agreement >= min_agree and (max_allowed is None or max_diff <= max_allowed)
    return {"n": int(len(reference)), "max_abs_diff": max_diff, "top1_agreement": agreement, "ok": bool(ok),
            "tolerance": {"max_abs_diff": max_allowed, "min_top1_agreement": min_agree}}


def batched(fn, x, batch_size=256):
    """Apply ``fn`` to ``x`` in batches and concatenate."""
    return np.concatenate([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(logits, y):
    """Top-1 accuracy."""
    return float(np.mean(np.argmax(logits, 1) == y))


def latency_ms(fn, sample, repeats=50):
    """Median single-example latency of ``fn`` in milliseconds (after a warm-up call)."""
    fn(sample)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(sample)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
