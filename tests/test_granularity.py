"""Structured connectivity (issue 10): block- and channel-granular BCS keep the exact budget at every step,
blocks stay whole, channel compaction gives the masked model's outputs, and block-sparse dense layers reach
LiteRT's sparse FULLY_CONNECTED kernel without DENSIFY."""

import json

import keras
import numpy as np
import pytest

from bcs_tf.robustness.attacks import AttackConfig
from bcs_tf.connectivity import allocate_budget, connectivity_report
from bcs_tf.errors import ConfigError
from bcs_tf.layers import ChannelGate, SparseConv2D, SparseDense, sparse_layers
from bcs_tf.models import build_model
from bcs_tf.objectives import make_objective
from bcs_tf.trainer import RobustTrainer
from export.strip import expected_nonzeros, kernel_nonzeros, strip_model
from bcs_run.config import CHANNEL_ALPHA, RunConfig
from training.run import main as train_main

from conftest import rewiring_steps


def _tiny(granularity, seed=0):
    """A conv + two dense layers at ``granularity`` (8×8×1 inputs, 4 classes)."""
    inputs = keras.Input((8, 8, 1))
    if granularity == "channel":
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
        x = ChannelGate(0.5, seed=seed, name="g1")(keras.layers.BatchNormalization()(x))
        x = keras.layers.Flatten()(keras.layers.ReLU()(x))
        x = ChannelGate(0.5, seed=seed + 1, name="g2")(keras.layers.Dense(16)(x))
        outputs = keras.layers.Dense(4)(keras.layers.ReLU()(x))
    else:
        block = 4 if granularity == "block" else 1
        x = SparseConv2D(4, 3, strides=2, connectivity=0.2, seed=seed, name="c1")(inputs)
        x = keras.layers.Flatten()(keras.layers.ReLU()(keras.layers.BatchNormalization()(x)))
        x = SparseDense(16, connectivity=0.2, seed=seed + 1, block_size=block, name="d1")(x)
        outputs = SparseDense(4, connectivity=0.2, seed=seed + 2, block_size=block, name="d2")(keras.layers.ReLU()(x))
    net = keras.Model(inputs, outputs)
    layers = sparse_layers(net)
    alloc = allocate_budget([layer.kernel_size_total for layer in layers], 0.3)
    for layer, n in zip(layers, alloc.counts):
        layer.reset_connectivity(n)
    return net, alloc


def _blocks_whole(layer):
    """Every block of a block-sparse layer's kernel is entirely nonzero (active) or entirely zero (dormant)."""
    kernel = np.asarray(layer.kernel)
    b = layer.block_size
    nonzero = (kernel != 0).reshape(kernel.shape[0] // b, b, kernel.shape[1])
    active = np.asarray(layer.theta) > 0
    return np.array_equal(nonzero.all(axis=1), active) and np.array_equal(nonzero.any(axis=1), active)


@pytest.mark.parametrize("granularity", ["weight", "block", "channel"])
def test_budget_is_exact_after_every_step_at_every_granularity(granularity):
    net, alloc = _tiny(granularity)
    trainer = RobustTrainer(net, make_objective("natural"), AttackConfig(0.1, 0.05, 2), allocation=alloc,
                            rewire=True, temperature=1e-3)
    trainer.compile(optimizer=keras.optimizers.SGD(2.0, momentum=0.9), jit_compile=False)
    trainer.prepare()
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(64, 8, 8, 1)).astype("float32"), rng.integers(0, 4, 64).astype("int32")
    moved = 0
    for step, dead in rewiring_steps(trainer, x, y, 30):
        moved += dead
        assert connectivity_report(net)["active"] == alloc.budgets[0], f"step {step}"
        assert trainer.budget_problem() is None
        for layer in trainer.sampler.layers:
            if isinstance(layer, SparseDense) and layer.block_size > 1:
                assert _blocks_whole(layer), f"step {step}: a block of {layer.name} is partly zero"
    assert moved > 0, "the test needs steps in which connections are rewired"


def test_block_is_bcs_with_a_direction_and_counts_blocks():
    layer = SparseDense(6, connectivity=0.25, seed=3, block_size=4)
    layer.build((None, 8))
    assert tuple(layer.theta.shape) == (2, 6) and tuple(layer.direction.shape) == (8, 6)
    assert layer.active_count() == 3 and layer.kernel_size_total == 12 and layer.group_size == 4
    kernel = np.asarray(layer.kernel).reshape(2, 4, 6)
    theta, sign = np.asarray(layer.theta), np.asarray(layer.sign)
    v = np.asarray(layer.direction).reshape(2, 4, 6)
    # w_g = γ_g·max(0, θ_g)·v_g/‖v_g‖: a block's norm is θ_g, its direction ±v_g, a dormant block is zero
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=1), np.maximum(theta, 0), rtol=1e-5, atol=1e-7)
    expected = (sign * np.maximum(theta, 0))[:, None, :] * v / np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-7)
    plain = SparseDense(6, connectivity=0.25, seed=3)
    plain.build((None, 8))
    assert not hasattr(plain, "direction")  # block size 1 is BCS itself
    with pytest.raises(ConfigError, match="blocks"):
        SparseDense(6, block_size=3).build((None, 8))


@pytest.mark.parametrize("name", ["small_cnn", "mobilenet"])
def test_channel_compaction_gives_the_masked_models_outputs(name):
    net, alloc = build_model(name, "bcs", 0.3, granularity="channel")
    rng = np.random.default_rng(1)
    for layer in net.layers:  # statistics far from the identity, so a wrong fold or slice shows
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.get_weights()])
    for gate in sparse_layers(net):  # gates away from 1 as well
        theta = np.asarray(gate.theta)
        gate.theta.assign(np.where(theta > 0, rng.uniform(0.2, 2.0, theta.shape), 0.0).astype("float32"))
    plain = strip_model(net)
    assert not sparse_layers(plain)
    x = rng.uniform(size=(16,) + net.input_shape[1:]).astype("float32")
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(net(x)), rtol=1e-4, atol=1e-4)
    gates = {gate.name[: -len("_gate")]: gate.active_count() for gate in sparse_layers(net)}
    assert sum(gates.values()) == alloc.budgets[0]
    widths = {layer.name: layer.output.shape[-1] for layer in plain.layers}
    for prefix, alive in gates.items():
        producer = f"{prefix}_conv" if f"{prefix}_conv" in widths else prefix
        if producer.startswith("dw"):  # a depthwise gate keeps the channels of the 1×1 (or stem) before it
            index = int(producer[2])
            producer = "stem_conv" if index == 1 else f"pw{index - 1}_conv"
        assert widths[producer] == alive, (producer, widths[producer], alive)
    assert plain.count_params() < net.count_params() / 3


def test_channel_granularity_refuses_residual_networks():
    with pytest.raises(ConfigError, match="residual"):
        build_model("resnet18", "bcs", 0.1, granularity="channel")


from conftest import TINY_RUN  # noqa: E402

FAST = TINY_RUN + ["--max-steps", "3", "--no-report"]


@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "block"
    assert train_main(FAST + ["--granularity", "block", "--connectivity", "0.05", "--out", str(out)]) == 0
    return out


def test_block_run_reports_blocks_and_exports_fc_without_densify(block_run):
    from export.__main__ import main as export_main
    from export.tflite_sparse import weight_storage

    metrics = json.loads((block_run / "metrics.json").read_text())
    assert metrics["connectivity"]["active"] == sum(metrics["allocation"]["budgets"])
    net = keras.models.load_model(block_run / "model.keras")
    plain = strip_model(net)
    assert sum(kernel_nonzeros(plain).values()) == expected_nonzeros(net)
    assert export_main([str(block_run), "--format", "tflite", "--n-examples", "64"]) == 0
    data = (block_run / "export" / "model.tflite").read_bytes()
    storage = dict(weight_storage(data)[-2:])  # the two dense layers come last
    assert [op for op, _ in weight_storage(data)][-2:] == ["FULLY_CONNECTED"] * 2
    assert set(dict(weight_storage(data)[-2:]).values()) == {"sparse kernel"}, storage
    report = json.loads((block_run / "export" / "export_report.json").read_text())["model.tflite"]
    assert report["nonzeros"]["exported"] == report["nonzeros"]["expected"] == expected_nonzeros(net)


def _compacted_sizes(budget, steps=12):
    """small_cnn at 30% of its channels under ``budget``, trained ``steps`` natural steps hot enough that
    channels die and come back: (per-layer counts and compacted parameters after each step, channels that died)."""
    from bcs_tf.compact import compact_channels

    net, alloc = build_model("small_cnn", "bcs", 0.3, budget=budget, granularity="channel")
    trainer = RobustTrainer(net, make_objective("natural"), AttackConfig(0.1, 0.05, 2), allocation=alloc,
                            rewire=True, temperature=0.05)
    trainer.compile(optimizer=keras.optimizers.SGD(2.0), jit_compile=False)
    trainer.prepare()
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(64, 28, 28, 1)).astype("float32"), rng.integers(0, 10, 64).astype("int32")
    after, moved = [], 0
    for _, dead in rewiring_steps(trainer, x, y, steps):
        moved += dead
        counts = tuple(int(np.sum(np.asarray(gate.theta) > 0)) for gate in trainer.sampler.layers)
        after.append((counts, compact_channels(net).count_params()))
    return alloc, compact_channels(build_model("small_cnn", "bcs", 0.3, budget=budget, granularity="channel")[0]
                                   ).count_params(), after, moved


def test_channel_granularity_holds_the_compacted_size_after_every_step():
    assert RunConfig(method="bcs", granularity="channel").effective_budget == "layer"
    assert RunConfig(method="bcs", granularity="weight").effective_budget == "global"
    alloc, start, after, moved = _compacted_sizes("layer")
    assert moved > 0, "the test needs channels that die and come back"
    for step, (counts, size) in enumerate(after):
        assert counts == alloc.counts and size == start, f"step {step}: {counts}, {size} parameters vs {start}"
    # what the per-layer default prevents: one global channel budget lets the size drift with the same steps
    _, start, after, moved = _compacted_sizes("global")
    assert moved > 0 and any(size != start for _, size in after)


@pytest.mark.parametrize("granularity,alpha,expected", [("channel", None, CHANNEL_ALPHA), ("weight", None, 0.0),
                                                         ("block", None, 0.0), ("channel", 0.0, 0.0),
                                                         ("weight", 2e-4, 2e-4)])
def test_channel_gates_get_an_l1_prior_of_their_own_by_default(granularity, alpha, expected):
    from training.methods.base import Context

    cfg = RunConfig(method="bcs", granularity=granularity, alpha=alpha, connectivity=0.3)
    net, allocation = build_model("small_cnn", "bcs", 0.3, granularity=granularity)
    trainer = Context(cfg, data=None, out=None).trainer(net, allocation, rewire=True)
    assert trainer.alpha == expected
    assert CHANNEL_ALPHA > 0


def test_granularity_is_refused_where_it_is_not_built(tmp_path, capsys):
    assert train_main(["--method", "fixed", "--from", str(tmp_path), "--granularity", "block",
                       "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--granularity" in err and not (tmp_path / "x").exists()


def test_full_width_twin_of_a_channel_network_keeps_every_channel_and_the_outputs():
    from bcs_tf.compact import compact_channels

    net, _ = build_model("small_cnn", "bcs", 0.3, granularity="channel")
    full = compact_channels(net, keep_all=True)
    assert [layer.output.shape[-1] for layer in full.layers if layer.name.endswith("_conv")] == [16, 32, 64]
    x = np.random.default_rng(2).uniform(size=(4, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(np.asarray(full(x)), np.asarray(net(x)), rtol=1e-4, atol=1e-5)


def test_sparse_mobilenet_export_is_eligible_for_xnnpack_sparse_inference_and_small_cnn_is_not():
    from export.tflite import convert
    from export.xnnpack_sparse import check

    mobile, _ = build_model("mobilenet", "bcs", 0.1)
    sparse, _ = convert(strip_model(mobile), "none", sparse=True)
    verdict = check(sparse)
    assert verdict["eligible"], verdict["reasons"]
    assert verdict["zero_fraction_1x1"] > 2 / 3
    dense, _ = convert(strip_model(mobile), "none", sparse=False)
    assert check(dense)["reasons"] == ["weights are stored dense (no DENSIFY)"]
    small, _ = build_model("small_cnn", "bcs", 0.1)
    blob, _ = convert(strip_model(small), "none", sparse=True)
    assert any("first convolution" in r for r in check(blob)["reasons"])


def test_device_benchmark_compares_a_compacted_channel_network_with_its_full_width(tmp_path, capsys):
    from bench.device import main as device_main

    out = tmp_path / "channel"
    assert train_main(FAST + ["--granularity", "channel", "--connectivity", "0.3", "--out", str(out)]) == 0
    assert device_main([str(out), "--quantize", "none", "--repeats", "5", "--no-onnx"]) == 0
    printed = capsys.readouterr().out
    assert "| tflite none | compact |" in printed and "| tflite none | full width |" in printed
    assert "compact / full width" in printed


def test_int8_blocks_of_16_reach_the_int8_sparse_fc_kernel_and_per_channel_scales_keep_more_connections():
    from export.tflite import convert
    from export.tflite_sparse import kernel_nonzeros, weight_storage

    net, _ = build_model("small_cnn", "bcs", 0.05, granularity="block", block_size=16)
    plain = strip_model(net)
    calib = np.random.default_rng(3).uniform(size=(16, 28, 28, 1)).astype("float32")
    data, _ = convert(plain, "int8", True, calib)
    assert [s for op, s in weight_storage(data) if op == "FULLY_CONNECTED"] == ["sparse kernel"] * 2
    per_tensor, _ = convert(plain, "int8", True, calib, "per-tensor")
    assert kernel_nonzeros(data) > kernel_nonzeros(per_tensor)  # the default (per-channel) zeroes fewer


def test_attack_exported_runs_square_on_the_file_itself(block_run):
    from export.__main__ import main as export_main

    assert export_main([str(block_run), "--format", "onnx", "--n-examples", "32", "--attack-exported",
                        "--attack-examples", "16", "--attack-queries", "10"]) == 0
    square = json.loads((block_run / "export" / "export_report.json").read_text())["model.onnx"]["robustness"][
        "square"]
    assert square["n"] == 16 and square["queries"] == 10
    assert 0.0 <= square["exported"] <= 1.0 and 0.0 <= square["keras"] <= 1.0
