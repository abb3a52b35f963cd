"""``python -m export --format micro``: a full-int8 file that runs on the TFLite Micro interpreter and agrees
with Keras, its C array, its op list, the arena search, the missing-package error and the zeroed-connection
guard."""

import json

import numpy as np
import pytest

from training.run import main as train_main

from conftest import TINY_RUN

FAST = TINY_RUN + ["--max-steps", "3", "--no-report"]

pytest.importorskip("tflite_micro", reason="the [micro] extra (tflite-micro) is not installed")
pytestmark = pytest.mark.integration  # every test trains a run or exports one


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "channel"
    assert train_main(FAST + ["--granularity", "channel", "--connectivity", "0.3", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def micro_export(channel_run):
    from export.__main__ import main as export_main

    assert export_main([str(channel_run), "--format", "micro", "--n-examples", "64", "--attack-exported",
                        "--attack-examples", "8", "--attack-queries", "5"]) == 0
    folder = channel_run / "export" / "micro"
    return folder, json.loads((folder / "export_report.json").read_text())["model_int8.tflite"]


def test_the_full_int8_file_runs_on_tflm_and_agrees_with_keras(micro_export):
    from export.micro import MicroRuntime

    folder, report = micro_export
    data = (folder / "model_int8.tflite").read_bytes()
    m = report["micro"]
    assert m["flash_bytes"] == len(data) and report["runtime"].startswith("tflite-micro")
    assert report["parity"]["top1_agreement"] >= 0.95 and report["parity"]["n"] == 64
    assert {"clean", "pgd20_transfer"} <= set(report["robustness"]["exported"])
    assert 0.0 <= report["robustness"]["square"]["exported"] <= 1.0
    runtime = MicroRuntime(data, m["arena"]["recommended_bytes"])
    x = np.random.default_rng(0).uniform(size=(3, *runtime.input["shape"][1:])).astype(np.float32)
    assert runtime.input["dtype"] == np.int8 and runtime(x).shape == (3, 10)


def test_the_c_array_holds_the_flatbuffer_and_the_header_its_quantization(micro_export):
    from export.micro import parse_c_array

    folder, report = micro_export
    source = (folder / "model_data.cc").read_text()
    assert "alignas(16) const unsigned char g_model_data[]" in source
    assert parse_c_array(source) == (folder / "model_int8.tflite").read_bytes()
    header = (folder / "model_data.h").read_text()
    assert f"kInputZeroPoint = {report['micro']['input_zero_point']};" in header
    assert f"kTensorArenaSize = {report['micro']['arena']['recommended_bytes']};" in header


def test_the_op_resolver_holds_exactly_the_ops_litert_runs(micro_export):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from export.micro import resolver_method

    folder, report = micro_export
    interpreter = Interpreter(model_content=(folder / "model_int8.tflite").read_bytes(),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_REF)  # no delegate node
    interpreter.allocate_tensors()
    ran = {op["op_name"] for op in interpreter._get_ops_details()}  # an independent reading of the graph
    assert set(report["micro"]["ops"]) == ran and "SHAPE" not in ran  # batch 1: no dynamic-shape ops
    header = (folder / "model_ops.h").read_text()
    assert "MicroMutableOpResolver<kModelOpCount>" in header and f"kModelOpCount = {len(ran)};" in header
    for op in ran:
        assert f"resolver.{resolver_method(op)}()" in header
    assert resolver_method("CONV_2D") == "AddConv2D" and resolver_method("FULLY_CONNECTED") == "AddFullyConnected"


def test_the_arena_search_finds_a_size_that_works_and_a_tenth_less_fails(micro_export, tmp_path):
    from export.micro import arena_works

    folder, report = micro_export
    smallest = report["micro"]["arena"]["smallest_bytes"]
    path = folder / "model_int8.tflite"
    assert arena_works(path, smallest)
    assert not arena_works(path, int(smallest * 0.9))


def test_micro_without_the_package_names_it_in_one_line(channel_run, monkeypatch, capsys):
    import importlib.util

    from export.__main__ import main as export_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tflite_micro" else real(name, *a))
    assert export_main([str(channel_run), "--format", "micro", "--out", str(channel_run / "m" / "x.tflite")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "pip install tflite-micro" in err and "\n" not in err
    assert not (channel_run / "m").exists()


def test_int8_refuses_when_too_many_trained_connections_would_vanish(tmp_path, capsys):
    from export.__main__ import main as export_main

    run = tmp_path / "bcs"
    assert train_main(FAST + ["--connectivity", "0.1", "--out", str(run)]) == 0
    out = tmp_path / "x.tflite"
    # BCS re-activates connections at θ = 1e-12: per-tensor int8 rounds them to zero
    code = export_main([str(run), "--format", "tflite", "--quantize", "int8", "--int8-weights", "per-tensor",
                        "--n-examples", "32", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "trained connections" in err and "--max-zeroed 0.01" in err and "\n" not in err, err
    assert not out.exists()
    assert export_main([str(run), "--format", "tflite", "--quantize", "int8", "--int8-weights", "per-tensor",
                        "--max-zeroed", "1", "--n-examples", "32", "--out", str(out)]) == 0
    nonzeros = json.loads((tmp_path / "export_report.json").read_text())["x.tflite"]["nonzeros"]
    assert nonzeros["rounded_to_zero_by_quantization"] > 0.01 * nonzeros["keras_stripped"]


@pytest.mark.slow
def test_the_budget_benchmark_fits_widths_to_flash_and_compares_the_families_on_tflm(tmp_path, capsys, monkeypatch):
    from bench import micro_report
    from bench.micro import main as bench_main

    out = tmp_path / "micro"
    flags = ["--dataset", "synthetic", "--flash", "8k,16k", "--key", "16k", "--seeds", "2", "--epochs", "1",
             "--max-steps", "2", "--val-split", "128", "--eval-examples", "32", "--aa-examples", "0",
             "--export-examples", "32", "--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--verbose", "0"]
    exported, write = [], micro_report.write_report
    monkeypatch.setattr(micro_report, "write_report", lambda *a: exported.append(len(a[-1])) or write(*a))
    assert bench_main(flags) == 0, capsys.readouterr()
    assert exported == [*range(1, 10), 9]  # exported and tabled as each run is collected, then once at the end
    manifest = json.loads((out / "manifest.json").read_text())
    fits = {int(budget): width for budget, width in manifest["fits"].items()}
    assert fits[8192] < fits[16384]
    by_width = {int(k): v for k, v in manifest["flash_by_width"].items()}
    for budget, width in fits.items():  # the widest width that fits, by the measured bytes
        assert by_width[width] <= budget and by_width.get(width + 1, budget + 1) > budget
    reports = sorted((out / "runs").glob("*/micro.json"))
    assert len(reports) == 3 * (2 + 1)  # three families, two seeds at the key budget, one at the other
    for path in reports:
        entry = json.loads(path.read_text())
        width = int(path.parent.name.split("_w")[1].split("of")[0])
        budget = next(b for b, w in fits.items() if w == width)
        assert entry["micro"]["flash_bytes"] <= budget  # every point is a real TFLM file within its budget
        assert entry["micro"]["flash_bytes"] == path.with_suffix(".tflite").stat().st_size
        assert (path.parent / "network.npz").is_file()  # the network behind the point is kept
    table = (out / "table.md").read_text()
    assert manifest["block_flash_bytes"] > 16384 and f"{manifest['block_flash_bytes']:,} bytes" in table
    assert table.count("| BCS channels − dense, narrower |") == 3 and (out / "micro.png").stat().st_size > 0
    # a second call trains and exports nothing again
    mtimes = {p: p.stat().st_mtime for p in reports}
    assert bench_main(flags) == 0
    assert mtimes == {p: p.stat().st_mtime for p in reports}
    # a third seed at the key budget later: only its three runs are trained, and the paired rows read 3 seeds
    assert bench_main([*flags, "--seeds", "3"]) == 0
    assert len(sorted((out / "runs").glob("*/micro.json"))) == 3 * (3 + 1)
    assert mtimes == {p: p.stat().st_mtime for p in reports}
    assert "| BCS channels − dense, narrower | clean | 3 |" in (out / "table.md").read_text()
