"""What a run's exported model costs on the device, sparse storage against its dense-stored twin (not a test).

For each requested LiteRT number format the run's stripped model is converted twice — sparse storage (what
``python -m export`` writes) and dense storage — and the ONNX export likewise (``sparse_initializer`` and dense).
Each file is measured in a fresh Python process (so one file's allocations do not hide another's): file size,
resident memory added by creating the interpreter and ``allocate_tensors`` (LiteRT, 1 thread) or the session
(onnxruntime, 1 thread), and the median single-example latency, for LiteRT under the default delegates (XNNPACK)
and under the reference kernels. The table also lists how every weighted op gets its weights: ``sparse kernel``
(stored sparse, computed sparse), ``densified`` (a DENSIFY op rebuilds dense weights at load: smaller file, dense
compute) or ``dense``. Ratios are sparse / dense, measured in one run. A channel-granular run is measured as its
compacted network against the full-width network it was cut from. The last lines say whether XNNPACK's sparse
inference would take each sparse file (export/xnnpack_sparse.py) and whether this CPU lets it.

    python -m bench.device RUN_DIR [--quantize none,int8] [--repeats 300]
"""

from __future__ import annotations

import collections
import json
import pathlib
import subprocess
import sys
import tempfile

from bcs_run import cli
from bcs_run.rundir import RunDir

# Runs in a fresh interpreter per file: RSS before/after loading, then the median latency of single examples.
PROBE = r"""
import json, sys, time, statistics
import numpy as np

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

path, kind, resolver, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if kind == "tflite":
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    op_resolver = {"default": OpResolverType.AUTO, "reference": OpResolverType.BUILTIN_REF}[resolver]
    before = rss()
    it = Interpreter(model_path=path, num_threads=1, experimental_op_resolver_type=op_resolver)
    it.allocate_tensors()
    after = rss()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    x = np.random.default_rng(0).uniform(size=inp["shape"]).astype(np.float32)
    if inp["dtype"] != np.float32:
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale + zero), -128, 127).astype(inp["dtype"])
    def call():
        it.set_tensor(inp["index"], x)
        it.invoke()
        return it.get_tensor(out["index"])
else:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    before = rss()
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    after = rss()
    name = sess.get_inputs()[0].name
    shape = [1] + [int(d) for d in sess.get_inputs()[0].shape[1:]]
    x = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
    def call():
        return sess.run(None, {name: x})
for _ in range(20):
    call()
times = []
for _ in range(repeats):
    t = time.perf_counter(); call(); times.append(time.perf_counter() - t)
print(json.dumps({"memory_bytes": after - before, "latency_ms": 1000 * statistics.median(times)}))
"""


def build_parser():
    """The benchmark's parser."""
    p = cli.parser("python -m bench.device", __doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished `training.run` directory")
    p.add_argument("--quantize", default="none,int8", metavar="Q1,Q2",
                   help="comma-separated LiteRT number formats: none, dynamic, float16, int8")
    p.add_argument("--repeats", type=cli.positive(int), default=300, metavar="N", help="timed single-example calls")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX files")
    return p


def probe(path, kind, resolver, repeats):
    """Memory and latency of one file, measured in a fresh process."""
    res = subprocess.run([sys.executable, "-c", PROBE, str(path), kind, resolver, str(repeats)],
                         capture_output=True, text=True)
    if res.returncode:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def files(run_dir, quantizes, onnx):
    """``{(format, storage): (kind, bytes, weight storage)}`` for the run's model and its twin; the storages
    are ("sparse", "dense"), or for a channel-granular run ("compact", "full width")."""
    from bcs_tf.data import load_dataset
    from export import onnx_export, tflite, tflite_sparse
    from bcs_tf.compact import compact_channels, has_channel_gates
    from export.strip import strip_model
    from bcs_run.config import load_finished_run

    cfg, model = load_finished_run(run_dir)
    data = load_dataset(cfg.dataset, val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir)
    if has_channel_gates(model):  # the compacted network against the full-width one it was cut from
        twins = {"compact": (strip_model(model), False),
                 "full width": (compact_channels(model, keep_all=True), False)}
    else:
        plain = strip_model(model)
        twins = {"sparse": (plain, True), "dense": (plain, False)}
    out = {}
    for q in quantizes:
        for storage, (net, sparse) in twins.items():
            with cli.native_output(0):
                blob, _ = tflite.convert(net, q, sparse, data.x_train[:200])
            out[(f"tflite {q}", storage)] = ("tflite", blob, tflite_sparse.weight_storage(blob))
    if onnx:
        for storage, (net, sparse) in twins.items():
            with cli.native_output(0):
                proto = onnx_export.to_onnx(net)
            moved = 0
            if sparse:
                proto, moved = onnx_export.sparsify(proto)
            out[("onnx", storage)] = ("onnx", proto.SerializeToString(), [("initializers", f"{moved} sparse")])
    return out


def _storage_summary(ops):
    counts = collections.Counter(f"{op} {storage}" for op, storage in ops)
    return ", ".join(f"{n}× {k}" for k, n in sorted(counts.items())) or "—"


@cli.one_line_errors
def main(argv=None):
    """Print one row per file and the sparse / dense ratios."""
    args = build_parser().parse_args(argv)
    quantizes = [q.strip() for q in args.quantize.split(",") if q.strip()]
    bad = [q for q in quantizes if q not in ("none", "dynamic", "float16", "int8")]
    if bad or not quantizes:
        raise cli.FlagError(f"--quantize: choose from none, dynamic, float16, int8. Received: {args.quantize!r}")
    if not RunDir(args.run_dir).model.is_file():
        raise cli.FlagError(f"{args.run_dir} has no model.keras (is it a finished `training.run` output?)")
    cli.import_tensorflow()
    built = files(args.run_dir, quantizes, not args.no_onnx)
    print(f"{args.run_dir}: 1 thread, median of {args.repeats} single-example calls; memory = RSS added by "
          "loading and allocating")
    print("| file | storage | KiB | memory MiB | latency ms (default) | latency ms (reference) | weighted ops |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (fmt, storage), (kind, blob, ops) in built.items():
            path = pathlib.Path(tmp) / f"{fmt.replace(' ', '_')}_{storage}.{kind}"
            path.write_bytes(blob)
            default = probe(path, kind, "default", args.repeats)
            reference = probe(path, kind, "reference", args.repeats) if kind == "tflite" else {}
            rows[(fmt, storage)] = (len(blob), default, reference)
            mem = f"{default['memory_bytes'] / 2**20:.1f}" if "memory_bytes" in default else default.get("error")
            lat = f"{default['latency_ms']:.3f}" if "latency_ms" in default else "—"
            ref = f"{reference['latency_ms']:.3f}" if "latency_ms" in reference else "—"
            print(f"| {fmt} | {storage} | {len(blob) / 1024:.1f} | {mem} | {lat} | {ref} | {_storage_summary(ops)} |",
                  flush=True)
    first, second = dict.fromkeys(storage for _, storage in rows)
    print(f"\n{first} / {second}: size, memory, latency (default delegates)")
    for fmt in dict.fromkeys(f for f, _ in rows):
        (s_size, s_def, _), (d_size, d_def, _) = rows[(fmt, first)], rows[(fmt, second)]
        ratios = [f"size {s_size / d_size:.3f}"]
        for key, label in (("memory_bytes", "memory"), ("latency_ms", "latency")):
            if key in s_def and key in d_def and d_def[key] > 0:
                ratios.append(f"{label} {s_def[key] / d_def[key]:.2f}")
        print(f"  {fmt}: " + ", ".join(ratios))
    _xnnpack_report(built)
    return 0


def _xnnpack_report(built):
    """Whether XNNPACK's sparse inference would take each sparse-stored LiteRT file, and whether this CPU lets it."""
    from export.xnnpack_sparse import check, cpu_runs_sparse_inference

    cpu = cpu_runs_sparse_inference()
    sparse = {fmt: blob for (fmt, storage), (kind, blob, _) in built.items()
              if kind == "tflite" and storage == "sparse"}
    if sparse:
        print("\nXNNPACK sparse inference (1×1 convolutions computed sparse; see export/xnnpack_sparse.py):")
    for fmt, blob in sparse.items():
        verdict = check(blob)
        if verdict["eligible"]:
            where = "runs sparse on this CPU" if cpu else "not on this CPU: XNNPACK turns it off on x86 with AVX"
            print(f"  {fmt}: eligible ({verdict['zero_fraction_1x1']:.0%} of 1×1 weights zero); {where}")
        else:
            print(f"  {fmt}: not eligible: {verdict['reasons'][0]}")


if __name__ == "__main__":
    sys.exit(main())
