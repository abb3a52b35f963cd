"""The export itself: a run's model stripped, converted, verified against the Keras model, written with its
report. ``python -m export`` checks the flags and calls :func:`export`."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from bcs_tf.connectivity import Allocation
from bcs_tf.data import load_dataset
from bcs_tf.errors import CheckpointError, ConfigError
from bcs_tf.layers import sparse_layers
from bcs_tf.robustness import Evaluator
from export import micro, onnx_export, tflite, tflite_sparse, verify, xnnpack_sparse
from export.options import default_out
from export.strip import expected_nonzeros, kernel_nonzeros, strip_model
from bcs_run.cli import native_output
from bcs_run.config import finished_network, load_finished_run
from bcs_run.rundir import RunDir, atomic_write

DEFAULT_EXAMPLES = 2000  # test images of the verification when --n-examples is not given


def load_run(run_dir):
    """(model, config, claimed budget) of a run directory; refuses runs whose sparsity is not the allocation
    their metrics.json records."""
    cfg, model = load_finished_run(run_dir)
    if not cfg.sparse:
        return model, cfg, None
    model_path = finished_network(run_dir)
    recorded = (RunDir(run_dir).read_json(RunDir.METRICS) or {}).get("allocation")
    layers = sparse_layers(model)
    if not recorded or not layers:
        raise CheckpointError(f"{model_path}: its run claims connectivity {cfg.connectivity} with method "
                              f"{cfg.method}, but " + ("the network has no sparse layers" if recorded else
                                                       "metrics.json records no allocation") + "; refusing")
    allocation = Allocation.from_dict(recorded)
    problem = allocation.problem([layer.active_count() for layer in layers], [layer.name for layer in layers])
    if problem:
        raise CheckpointError(f"{model_path} has {problem} (connectivity {cfg.connectivity}); refusing")
    return model, cfg, sum(allocation.budgets)


def _keras_loads_without_project(data):
    """Whether a .keras file loads with plain Keras in a Python that never imported bcs_tf."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.keras"
        path.write_bytes(data)
        code = ("import sys, keras; keras.models.load_model(sys.argv[1]); "
                "assert not any(m.startswith('bcs_tf') for m in sys.modules)")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                             cwd=tmp)
        return res.returncode == 0, res.stderr.strip().splitlines()[-1:] if res.returncode else []


def build_export(plain, fmt, quantize, args, data_train, sample, sparse):
    """Serialized bytes, a runtime callable (batch → logits), the number format and conversion info."""
    info = {"warnings": []}
    if fmt == "keras":
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "m.keras"
            plain.save(path)
            data = path.read_bytes()
        ok, err = _keras_loads_without_project(data)
        info["loads_without_bcs_tf"] = ok
        if not ok:
            info["warnings"].append(f"stripped .keras does not load without bcs_tf: {err}")
        return data, lambda x: np.asarray(plain(x, training=False)), "float32", info, None
    if fmt == "micro":
        return build_micro(plain, data_train[: args.calibration_examples], args.verbose, info)
    if fmt == "tflite":
        calib = data_train[: args.calibration_examples]
        with native_output(args.verbose):  # the converter's and the interpreter's debris stay off the terminal
            data, info = tflite.export_tflite(plain, quantize, calib, sample, sparse=sparse,
                                              int8_weights=args.int8_weights)
            resolver = "default" if info["loads"]["default"] == "ok" else "reference"
            it = tflite.interpreter(data, resolver)
        info.setdefault("warnings", [])
        info["xnnpack_sparse_inference"] = {**xnnpack_sparse.check(data),
                                            "this_cpu_allows_it": xnnpack_sparse.cpu_runs_sparse_inference()}
        number_format = {"none": "float32"}.get(quantize, quantize)
        info["runtime"] = f"ai-edge-litert ({resolver} kernels)"
        return data, lambda x: tflite.run(it, x), number_format, info, tflite_sparse.kernel_nonzeros(data)
    with native_output(args.verbose):
        proto = onnx_export.to_onnx(plain)
    moved = 0
    if not args.onnx_dense:
        proto, moved = onnx_export.sparsify(proto)
    data = proto.SerializeToString()
    sess = onnx_export.session(data)
    info.update(runtime="onnxruntime", opset=onnx_export.OPSET, sparse_initializers=moved)
    return data, lambda x: onnx_export.run(sess, x), "float32", info, onnx_export.kernel_nonzeros(proto)


def build_micro(plain, calib, verbose, info):
    """:func:`build_export` of ``--format micro``: the full-int8 file, run on the TFLM interpreter with the arena
    its search found (plus the margin)."""
    micro.require_tflm()
    with native_output(verbose):
        data = micro.convert(plain, calib)
    smallest = micro.smallest_arena(data)
    arena = {"smallest_bytes": smallest, "margin": micro.ARENA_MARGIN,
             "recommended_bytes": micro.recommended_arena(smallest),
             "measured_on": "tflite-micro's x86 interpreter (reference kernels), bisection to 16 bytes"}
    runtime = micro.MicroRuntime(data, arena["recommended_bytes"])
    info.update(runtime="tflite-micro (x86 build, reference kernels)", micro={
        "flash_bytes": len(data), "arena": arena, "ops": micro.ops(data), **runtime.quantization(),
        "weights": "int8 per-channel, dense storage (TFLM has no sparse tensors)"})
    return data, runtime, "int8", info, tflite_sparse.kernel_nonzeros(data)


def export(args):
    """Run one export of ``args`` as checked by ``export.__main__.parse_args`` (which refuses an existing output);
    returns its report entry. Nothing is written when a check refuses."""
    out = pathlib.Path(args.out) if args.out else default_out(args.run_dir, args.format, args.quantize)
    model, cfg, budget = load_run(args.run_dir)
    plain = strip_model(model)
    # the nonzero weights the active connections carry (None: a channel-granular network, compacted dense)
    expected = expected_nonzeros(model) if budget is not None else None
    data_set = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
    n = min(DEFAULT_EXAMPLES, len(data_set.x_test)) if args.n_examples is None else args.n_examples
    if n > len(data_set.x_test):
        raise ConfigError(f"--n-examples: the {cfg.dataset} test set has {len(data_set.x_test)} examples. "
                          f"Received: {n}")
    x, y = data_set.x_test[:n], data_set.y_test[:n]
    data, runtime, number_format, info, exported_nnz = build_export(
        plain, args.format, args.quantize, args, data_set.x_train, x[:1], expected is not None)
    keras_nnz = sum(kernel_nonzeros(plain).values())
    exported_nnz = keras_nnz if exported_nnz is None else exported_nnz

    reference = verify.batched(lambda b: np.asarray(model(b, training=False)), x)
    exported_logits = verify.batched(runtime, x)
    par = verify.parity(reference, exported_logits, number_format)
    report = {
        "file": str(out), "format": args.format, "quantize": args.quantize, "number_format": number_format,
        "run_dir": str(args.run_dir), "parity": par,
        "nonzeros": {"budget": budget, "granularity": cfg.granularity, "expected": expected,
                     "keras_stripped": keras_nnz, "exported": exported_nnz},
        "size": verify.size_report(data, keras_nnz, verify.dense_parameter_count(plain), number_format),
        **info,
    }
    if expected is not None and keras_nnz != expected:
        raise CheckpointError(f"stripped model has {keras_nnz} nonzero weights, its {budget} connections carry "
                              f"{expected}; refusing")
    # float32 must keep every connection; narrower formats may round the tiniest weights (θ = 1e-12 for
    # freshly re-activated entries) to zero, which is reported below.
    if number_format == "float32" and expected is not None and exported_nnz != expected:
        raise CheckpointError(f"exported file has {exported_nnz} nonzero weights, expected {expected}; refusing")
    if exported_nnz < keras_nnz:
        report["nonzeros"]["rounded_to_zero_by_quantization"] = keras_nnz - exported_nnz
    zeroed = (keras_nnz - exported_nnz) / keras_nnz if keras_nnz else 0.0
    # a dense network's tiniest weights are no trained connections; a sparse one's are (re-activated ones)
    if number_format == "int8" and cfg.sparse and zeroed > args.max_zeroed:
        raise ConfigError(f"int8 rounds {keras_nnz - exported_nnz:,} of the {keras_nnz:,} trained connections "
                          f"({zeroed:.1%}) to zero (weights below half an int8 step of their channel), more than "
                          f"--max-zeroed {args.max_zeroed:g}; nothing written"
                          + ("; per-channel scales zero fewer" if args.int8_weights == "per-tensor" else
                             f"; --max-zeroed {math.ceil(100 * zeroed) / 100:g} writes it anyway"))
    if not par["ok"]:
        message = (f"parity check failed: top-1 agreement {par['top1_agreement']:.4f}, max |Δlogit| "
                   f"{par['max_abs_diff']:.3g} (tolerance {par['tolerance']})")
        if not args.allow_mismatch:
            raise ConfigError(message + "; nothing written (--allow-mismatch to write anyway)")
        report["warnings"].append(message + "; written anyway because of --allow-mismatch")

    x_adv = Evaluator(model, cfg.eps, None, verbose=0).pgd_examples(x, y, 20)
    report["robustness"] = {
        "eps": cfg.eps, "attack": "PGD-20 L-inf crafted against the Keras model (transfer)", "n": int(len(x)),
        "keras": {"clean": verify.accuracy(reference, y),
                  "pgd20": verify.accuracy(verify.batched(lambda b: np.asarray(model(b)), x_adv), y)},
        "exported": {"clean": verify.accuracy(exported_logits, y),
                     "pgd20_transfer": verify.accuracy(verify.batched(runtime, x_adv), y)},
    }
    if args.attack_exported:
        with native_output(args.verbose):  # ART's import warns that PyTorch is absent
            from bcs_tf.robustness.art import black_box_square
        n_attack = min(args.attack_examples, len(x))
        xs, ys = x[:n_attack], y[:n_attack]
        report["robustness"]["square"] = {
            "queries": args.attack_queries, "n": n_attack, "attack": "ART Square L-inf, black-box (scores only)",
            "exported": black_box_square(runtime, xs, ys, cfg.eps, args.attack_queries),
            "keras": black_box_square(lambda b: np.asarray(model(b, training=False)), xs, ys, cfg.eps,
                                             args.attack_queries)}
    report["latency_ms"] = {"median_single_example": verify.latency_ms(runtime, x[:1]),
                            "keras_median_single_example": verify.latency_ms(
                                lambda b: np.asarray(plain(b, training=False)), x[:1])}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data)
    if args.format == "micro":
        m = report["micro"]
        files = {**micro.c_sources(data, m), "model_ops.h": micro.ops_header(m["ops"])}
        for name, text in files.items():
            atomic_write(out.parent / name, text)
        m["files"] = sorted(files)
    write_report(out.parent / "export_report.json", out.name, report)
    return report


def write_report(path, key, entry):
    """Merge ``entry`` under ``key`` into the JSON report at ``path`` (other entries are kept)."""
    reports = {}
    if path.is_file():
        try:
            reports = json.loads(path.read_text())
        except ValueError:
            path.rename(path.with_suffix(".json.corrupt"))  # keep the user's file, start a new report
    reports[key] = entry
    atomic_write(path, json.dumps(reports, indent=1))
