"""The compact network archive: lossless, small, and accepted wherever a run directory is."""

import json
import shutil

import keras
import numpy as np
import pytest

from bcs_tf.archive import load_archive, save_archive
from bcs_tf.data import load_dataset
from bcs_tf.errors import CheckpointError
from bcs_tf.models import build_model
from export.__main__ import main as export_main
from training.archive import main as archive_main
from training.evaluate import main as evaluate_main
from training.run import main as run_main


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bcs"
    assert run_main(["--dataset", "synthetic", "--val-split", "128", "--attack-steps", "2", "--eval-steps", "2",
                     "--objective", "at", "--method", "bcs", "--connectivity", "0.05", "--max-steps", "3",
                     "--verbose", "0", "--no-report", "--out", str(out)]) == 0
    return out


def test_a_99_percent_sparse_small_cnn_archives_in_under_100_kb_and_loads_exactly(tmp_path):
    net, _ = build_model("small_cnn", "bcs", 0.01, input_shape=(28, 28, 1), seed=3)
    for layer in net.layers:  # BatchNorm statistics that are not the defaults, so their copy is tested too
        if isinstance(layer, keras.layers.BatchNormalization):
            for v in layer.weights:
                v.assign(np.random.default_rng(1).uniform(0.5, 1.5, v.shape).astype("float32"))
    size = save_archive(net, tmp_path / "n.npz", {"config": {"connectivity": 0.01}})
    assert size <= 100_000
    meta, loaded = load_archive(tmp_path / "n.npz")
    assert meta == {"config": {"connectivity": 0.01}}
    x = np.random.default_rng(0).uniform(0, 1, (16, 28, 28, 1)).astype("float32")
    np.testing.assert_array_equal(np.asarray(net(x)), np.asarray(loaded(x)))


def test_a_channel_granular_network_archives_about_as_small_as_its_compacted_twin_and_loads_exactly(tmp_path):
    def randomise(net):  # trained-looking weights everywhere, dormant channels included (they do not compress)
        rng = np.random.default_rng(1)
        for v in net.weights:
            if "theta" not in v.path and "sign" not in v.path:
                v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
        return net

    gated, _ = build_model("small_cnn", "bcs", 11 / 32, input_shape=(28, 28, 1), seed=3, granularity="channel",
                           budget="layer")
    narrow, _ = build_model("small_cnn", "dense", 1.0, input_shape=(28, 28, 1), width=11 / 32)
    gated_size = save_archive(randomise(gated), tmp_path / "gated.npz")
    narrow_size = save_archive(randomise(narrow), tmp_path / "narrow.npz")
    assert gated_size < 1.5 * narrow_size  # the full-width weights stored whole would take ≈ 8× the narrow ones
    _, loaded = load_archive(tmp_path / "gated.npz")
    x = np.random.default_rng(0).uniform(0, 1, (16, 28, 28, 1)).astype("float32")
    np.testing.assert_array_equal(np.asarray(gated(x)), np.asarray(loaded(x)))


def test_the_archive_of_a_run_gives_the_logits_of_its_model_keras_and_is_evaluated_and_exported(sparse_run,
                                                                                                 tmp_path):
    assert (sparse_run / "COMPLETE").is_file()  # training.run's last write
    assert archive_main([str(sparse_run), "--verbose", "0"]) == 0
    collected = tmp_path / "collected"  # what a results directory keeps: no model.keras, no checkpoint
    collected.mkdir()
    for name in ("network.npz", "metrics.json"):
        shutil.copy(sparse_run / name, collected / name)
    data = load_dataset("synthetic", val_split=128)
    original = keras.models.load_model(sparse_run / "model.keras")
    _, archived = load_archive(collected / "network.npz")
    np.testing.assert_array_equal(np.asarray(original(data.x_test[:64])), np.asarray(archived(data.x_test[:64])))
    assert evaluate_main([str(collected), "--attacks", "clean,pgd2", "--n-examples", "32", "--verbose", "0",
                          "--no-report"]) == 0
    report = json.loads((collected / "eval.json").read_text())
    assert set(report["attacks"]) == {"clean", "pgd2"}
    assert export_main([str(collected), "--format", "keras", "--n-examples", "32", "--verbose", "0"]) == 0
    # an archive alone is rewritten from itself only when asked, and still computes the same logits
    assert archive_main([str(collected), "--verbose", "0"]) == 2
    assert archive_main([str(collected), "--overwrite", "--verbose", "0"]) == 0
    _, rewritten = load_archive(collected / "network.npz")
    np.testing.assert_array_equal(np.asarray(original(data.x_test[:64])), np.asarray(rewritten(data.x_test[:64])))


def test_a_damaged_archive_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    save_archive(build_model("small_cnn", "bcs", 0.01, input_shape=(28, 28, 1), seed=3)[0], tmp_path / "whole.npz")
    whole = (tmp_path / "whole.npz").read_bytes()
    for data in (b"not an archive", whole[: len(whole) // 2]):  # garbage, and a real archive cut in half
        (bad / "network.npz").write_bytes(data)
        with pytest.raises(CheckpointError, match="not an .npz"):
            load_archive(bad / "network.npz")
        assert evaluate_main([str(bad), "--attacks", "clean", "--verbose", "0"]) == 2
        err = capsys.readouterr().err
        assert "network.npz" in err and "not an .npz" in err and "pickle" not in err
