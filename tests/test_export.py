import json

import keras
import numpy as np
import pytest

from bcs_tf.layers import sparse_layers
from export.__main__ import main as export_main
from export.strip import kernel_nonzeros, strip_model
from export.tflite import convert
from training.run import main as train_main

from conftest import TINY_RUN  # noqa: E402

FAST = TINY_RUN + ["--max-steps", "3", "--connectivity", "0.01"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sparse"
    assert train_main(FAST + ["--out", str(out)]) == 0
    return out


def _export(run_dir, *flags):
    return export_main([str(run_dir), "--n-examples", "64", "--calibration-examples", "32", *flags])


def _report(run_dir, name):
    return json.loads((run_dir / "export" / "export_report.json").read_text())[name]


def test_strip_is_exact_and_uses_only_standard_layers(run_dir):
    net = keras.models.load_model(run_dir / "model.keras")
    plain = strip_model(net)
    x = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype("float32")
    np.testing.assert_array_equal(np.asarray(net(x)), np.asarray(plain(x)))
    assert all(layer.__class__.__module__.startswith("keras") for layer in plain.layers)
    budget = json.loads((run_dir / "metrics.json").read_text())["allocation"]["budgets"][0]
    assert sum(kernel_nonzeros(plain).values()) == budget


@pytest.mark.parametrize("fmt,quantize,name", [
    ("keras", "none", "model.keras"),
    ("tflite", "none", "model.tflite"),
    ("tflite", "int8", "model_int8.tflite"),
    ("tflite", "dynamic", "model_dynamic.tflite"),
    ("onnx", "none", "model.onnx"),
])
def test_each_format_round_trips_within_parity_bounds(run_dir, fmt, quantize, name):
    # BCS keeps connections far below their channel's largest weight (re-activated at θ = 1e-12), which int8
    # rounds to zero: allowed here, counted below (tests/test_micro.py tests the refusal)
    zeroed = ["--max-zeroed", "1"] if quantize == "int8" else []
    assert _export(run_dir, "--format", fmt, "--quantize", quantize, *zeroed) == 0
    report = _report(run_dir, name)
    assert report["parity"]["ok"] and (run_dir / "export" / name).is_file()
    budget = report["nonzeros"]["budget"]
    if quantize == "none":
        assert report["nonzeros"]["exported"] == budget
        assert report["parity"]["top1_agreement"] >= 0.999
    else:
        assert report["nonzeros"]["exported"] <= budget
        assert report["nonzeros"].get("rounded_to_zero_by_quantization", 0) == budget - report["nonzeros"]["exported"]
    if fmt == "tflite":
        assert report["loads"]["default"] == "ok"  # never a file that fails with the defaults
    if fmt == "keras":
        assert report["loads_without_bcs_tf"] is True
    rob = report["robustness"]
    assert 0 <= rob["exported"]["pgd20_transfer"] <= 1 and rob["keras"]["pgd20"] <= rob["keras"]["clean"]


def test_sparse_tflite_is_much_smaller_than_dense(run_dir):
    plain = strip_model(keras.models.load_model(run_dir / "model.keras"))
    sparse, _ = convert(plain, "none", sparse=True)
    dense, _ = convert(plain, "none", sparse=False)
    assert len(dense) >= 5 * len(sparse), (len(dense), len(sparse))
    from export.tflite_sparse import weight_storage

    # today's sparse storage is rebuilt dense at load (DENSIFY), so no op computes sparse (issue 10)
    assert {storage for _, storage in weight_storage(sparse)} == {"densified"}
    assert {storage for _, storage in weight_storage(dense)} == {"dense"}
    assert [op for op, _ in weight_storage(sparse)] == ["CONV_2D"] * 3 + ["FULLY_CONNECTED"] * 2


def test_device_benchmark_measures_both_twins(run_dir, capsys):
    from bench.device import main as device_main

    assert device_main([str(run_dir), "--quantize", "none", "--repeats", "5", "--no-onnx"]) == 0
    out = capsys.readouterr().out
    assert "| tflite none | sparse |" in out and "| tflite none | dense |" in out and "tflite none: size 0.0" in out


def test_model_with_wrong_connection_count_is_refused(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "metrics.json"):
        (bad / name).write_text((run_dir / name).read_text())
    net = keras.models.load_model(run_dir / "model.keras")
    layer = sparse_layers(net)[-1]
    theta = np.asarray(layer.theta).copy()
    theta.flat[np.flatnonzero(theta <= 0)[0]] = 0.5  # one connection too many
    layer.theta.assign(theta)
    net.save(bad / "model.keras")
    assert _export(bad, "--format", "tflite") == 2
    assert "active connections" in capsys.readouterr().err
    assert not (bad / "export").exists()


def test_missing_model_and_existing_output_are_clear_errors(run_dir, tmp_path, capsys):
    assert _export(tmp_path, "--format", "onnx") == 2
    assert "model.keras" in capsys.readouterr().err
    existing = tmp_path / "x.tflite"
    existing.write_bytes(b"keep me")
    assert _export(run_dir, "--format", "tflite", "--out", str(existing)) == 2
    assert existing.read_bytes() == b"keep me"


def test_csr_codec_round_trips_any_sparse_tensor():
    from tensorflow.lite.python import schema_py_generated as schema

    from export.tflite_sparse import decode_sparse, encode_csr

    rng = np.random.default_rng(0)
    for shape in [(7, 300), (4, 3, 3, 5), (2, 70000)]:
        dense = (rng.uniform(size=shape) < 0.05) * rng.normal(size=shape)
        dense = dense.astype("float32")
        sp, values = encode_csr(dense)
        tensor = schema.TensorT()
        tensor.shape, tensor.type, tensor.sparsity = list(shape), schema.TensorType.FLOAT32, sp
        np.testing.assert_array_equal(decode_sparse(tensor, np.frombuffer(values, np.uint8)), dense)


def test_predict_cli_classifies_with_litert(run_dir, capsys, tmp_path):
    from export.predict import main as predict_main

    image = tmp_path / "x.npy"
    np.save(image, np.random.default_rng(0).uniform(size=(28, 28)).astype("float32"))
    model = run_dir / "export" / "model.tflite"
    if not model.exists():
        assert _export(run_dir, "--format", "tflite") == 0
    assert predict_main([str(model), "--image", str(image)]) == 0
    assert "p=" in capsys.readouterr().out
    # bad input: one line that names it, never LiteRT's or PIL's stack trace
    np.save(image, np.zeros((32, 32, 3)))
    (tmp_path / "x.png").write_text("not a picture")
    for argv, problem in [([str(model), "--image", str(image)], "shape (32, 32, 3); the model takes 28x28x1"),
                          ([str(model), "--image", str(tmp_path / "x.png")], "cannot read"),
                          ([str(tmp_path / "x.png")], "is not a TFLite model")]:
        assert predict_main(argv) == 2
        assert problem in capsys.readouterr().err


def test_predict_follows_the_models_input_shape(tmp_path, capsys):
    import matplotlib.image
    import tensorflow as tf

    from export.predict import main as predict_main

    inputs = keras.Input((8, 8, 3))
    net = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)))
    model = tmp_path / "rgb.tflite"
    model.write_bytes(tf.lite.TFLiteConverter.from_keras_model(net).convert())
    capsys.readouterr()  # the converter's own output
    matplotlib.image.imsave(tmp_path / "x.png", np.random.default_rng(0).uniform(size=(8, 8)), cmap="gray")  # RGBA
    assert predict_main([str(model), "--image", str(tmp_path / "x.png"), "--verbose", "0"]) == 0
    assert capsys.readouterr().out.startswith("class ")  # not a Fashion-MNIST name: 4 classes, colour input
    assert predict_main([str(model), "--index", "3", "--verbose", "0"]) == 2
    assert "takes 8x8x3 images: pass --image" in capsys.readouterr().err
