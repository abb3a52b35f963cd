"""The baselines that start from another run: fixed, HYDRA, lottery tickets (+ re-init control) and IWI."""

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from bcs_tf.robustness.attacks import AttackConfig
from bcs_tf.hydra import HydraScoreTrainer, scaled_score_init
from bcs_tf.inheritance import inherit_weights, inherited_positions
from bcs_tf.layers import sparse_layers
from bcs_tf.masks import kernels, magnitude_masks, static_masked_network, transfer
from bcs_tf.models import build_model
from bcs_tf.objectives import make_objective
from bcs_run.config import RunConfig
from bcs_run.rundir import RunDir
from training.run import main

from conftest import TINY_RUN  # noqa: E402

FAST = TINY_RUN + ["--batch-size", "128", "--objective", "at"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dense"
    assert main(FAST + ["--method", "dense", "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def small_sparse_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "small"
    assert main(FAST + ["--method", "bcs", "--connectivity", "0.1", "--max-steps", "3", "--out", str(out)]) == 0
    return out


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def _exact_budget(metrics):
    return metrics["connectivity"]["active"] == sum(metrics["allocation"]["budgets"])


@pytest.mark.parametrize("budget", ["global", "layer"])
@pytest.mark.parametrize("method,extra", [
    ("fixed", []),
    ("hydra", ["--score-epochs", "1"]),
    ("lottery", ["--prune-rounds", "2", "--round-epochs", "1"]),
])
def test_every_pruning_method_hits_its_exact_budget(tmp_path, dense_run, method, extra, budget):
    out = tmp_path / method
    assert main(FAST + ["--method", method, "--from", str(dense_run), "--connectivity", "0.05", "--budget", budget,
                        "--max-steps", "3", "--out", str(out)] + extra) == 0
    metrics = _metrics(out)
    assert _exact_budget(metrics)
    logged = {k: v for k, v in metrics["history"][-1].items() if k.startswith("active/")}
    assert len(logged) == 5 and sum(logged.values()) == sum(metrics["allocation"]["budgets"])
    expected = RunConfig(connectivity=0.05)  # the budget the allocation rules give for this network
    net, allocation = build_model("small_cnn", "random", expected.connectivity, budget)
    assert metrics["allocation"]["budgets"] == list(allocation.budgets)
    if budget == "layer":
        per_layer = [v["active"] for v in metrics["connectivity"]["layers"].values()]
        assert per_layer == list(allocation.budgets)
    if method == "lottery":
        assert (out / "phases" / "round1" / "checkpoint" / "state.json").is_file()
        assert metrics["method"]["round_connectivities"] == pytest.approx([0.05 ** 0.5, 0.05])
    if method == "hydra":
        assert (out / "phases" / "hydra_scores" / "checkpoint" / "state.json").is_file()


def test_iwi_refuses_a_channel_granular_source(tmp_path, capsys):
    src = tmp_path / "channel"
    assert main(FAST + ["--method", "bcs", "--granularity", "channel", "--connectivity", "0.5", "--max-steps", "2",
                        "--out", str(src)]) == 0
    capsys.readouterr()
    assert main(FAST + ["--method", "iwi", "--from", str(src), "--model", "small_cnn_x2", "--connectivity", "1",
                        "--out", str(tmp_path / "iwi")]) == 2
    assert "channel-granular" in capsys.readouterr().err
    assert not (tmp_path / "iwi").exists()


def test_iwi_trains_the_large_network_from_the_small_one(tmp_path, small_sparse_run):
    out = tmp_path / "iwi"
    assert main(FAST + ["--method", "iwi", "--from", str(small_sparse_run), "--model", "small_cnn_x2",
                        "--connectivity", "1", "--max-steps", "2", "--out", str(out)]) == 0
    metrics = _metrics(out)
    assert metrics["method"]["small_model"] == "small_cnn" and metrics["connectivity"]["connectivity"] == 1.0


@pytest.mark.parametrize("case", ["sparse_source", "other_model", "other_dataset", "unfinished", "no_snapshot",
                                  "iwi_dense", "iwi_narrower", "missing"])
def test_a_wrong_from_run_stops_with_one_line_and_writes_nothing(tmp_path, capsys, dense_run, small_sparse_run,
                                                                  case):
    method, source, extra = "fixed", dense_run, ["--connectivity", "0.1"]
    if case == "sparse_source":
        source = small_sparse_run
    elif case == "other_model":
        extra += ["--model", "small_cnn_x2"]
    elif case == "unfinished":
        source = tmp_path / "unfinished"
        source.mkdir()
        (source / "config.json").write_text((dense_run / "config.json").read_text())
    elif case == "no_snapshot":
        method, extra = "lottery", extra + ["--rewind-epoch", "7"]
    elif case == "iwi_dense":
        method, extra = "iwi", ["--model", "small_cnn_x2", "--connectivity", "1"]
    elif case == "iwi_narrower":
        method, extra = "iwi", ["--model", "small_cnn", "--connectivity", "1"]
        source = tmp_path / "wide"
        source.mkdir()
        for name in ("config.json", "metrics.json", "model.keras"):
            (source / name).write_bytes((small_sparse_run / name).read_bytes())
        cfg = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**cfg, "model": "small_cnn_x4"}))
    elif case == "missing":
        source = tmp_path / "nowhere"
    out = tmp_path / "out"
    flags = FAST + ["--method", method, "--from", str(source), "--out", str(out)] + extra
    if case == "other_dataset":
        flags[flags.index("synthetic")] = "fashion_mnist"
    assert main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and ("--from" in err or "--rewind-epoch" in err), err
    assert not out.exists()


# ---- library level: the algorithms themselves --------------------------------------------------------------


def _trained_dense(seed=0):
    net, _ = build_model("small_cnn", "dense", 1.0, seed=seed, input_shape=(12, 12, 1), num_classes=4)
    return net


def test_fixed_keeps_the_largest_weights_with_their_values():
    dense = _trained_dense()
    net, allocation = build_model("small_cnn", "random", 0.05, seed=0, input_shape=(12, 12, 1), num_classes=4)
    w = kernels(dense)
    layers = sparse_layers(net)
    masks = magnitude_masks([w[layer.name] for layer in layers], allocation)
    net, alloc = static_masked_network(net, allocation, masks, dense)
    flat = np.concatenate([np.abs(w[layer.name]).ravel() for layer in layers])
    threshold = np.sort(flat)[::-1][allocation.budgets[0] - 1]
    new = kernels(net)
    for layer, mask in zip(layers, masks):
        assert np.all(np.abs(w[layer.name][mask]) >= threshold)
        np.testing.assert_array_equal(new[layer.name][mask], w[layer.name][mask])
        assert np.all(new[layer.name][~mask] == 0)
    assert sum(alloc.counts) == allocation.budgets[0] == sum(layer.active_count() for layer in layers)


def _hydra_setup(connectivity=0.1):
    dense = _trained_dense()
    net, allocation = build_model("small_cnn", "random", connectivity, seed=0, input_shape=(12, 12, 1),
                                  num_classes=4)
    transfer(dense, net, {layer.name: np.ones(tuple(layer.theta.shape), bool) for layer in sparse_layers(net)})
    trainer = HydraScoreTrainer(net, make_objective("at"), AttackConfig(eps=0.1, step_size=0.05, steps=2),
                                allocation, seed=0)
    return dense, net, allocation, trainer


def test_hydra_scores_learn_while_weights_stay_frozen_and_the_mask_is_their_top_k():
    dense, net, allocation, trainer = _hydra_setup()
    layers = sparse_layers(net)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(trainer.scores[0]), scaled_score_init(layers[0]))
    theta_before = [keras.ops.convert_to_numpy(layer.theta).copy() for layer in layers]
    bias_before = keras.ops.convert_to_numpy(layers[-1].bias).copy()
    scores_before = [keras.ops.convert_to_numpy(s).copy() for s in trainer.scores]
    x = np.random.default_rng(0).uniform(size=(16, 12, 12, 1)).astype("float32")
    y = np.arange(16, dtype="int32") % 4

    with tf.GradientTape() as tape, trainer.training_kernels():
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, net(x, training=True),
                                                                           from_logits=True))
    grads = tape.gradient(loss, trainer.scores)
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)

    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=False)
    trainer.prepare()
    assert not any(v is layer.theta for v in trainer.trainable_variables for layer in layers)
    trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=2, verbose=0)
    for layer, before in zip(layers, theta_before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.theta), before)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layers[-1].bias), bias_before)
    assert any(np.any(keras.ops.convert_to_numpy(s) != b) for s, b in zip(trainer.scores, scores_before))

    masks = trainer.masks()
    scores = np.concatenate([np.abs(keras.ops.convert_to_numpy(s)).ravel() for s in trainer.scores])
    kept = np.concatenate([m.ravel() for m in masks])
    assert kept.sum() == allocation.budgets[0]
    assert scores[kept].min() >= scores[~kept].max()
    # the forward pass used exactly this subnetwork
    with trainer.inference_kernels():
        for layer, mask in zip(layers, masks):
            effective = keras.ops.convert_to_numpy(layer.kernel)
            assert np.all(effective[~mask] == 0) and np.count_nonzero(effective[mask]) == mask.sum()


def _lottery_start(tmp_path, dense_run):
    from bcs_tf.data import load_dataset
    from training.methods import METHODS, Context

    cfg = RunConfig(method="lottery", objective="at", from_run=str(dense_run), connectivity=0.1, dataset="synthetic",
                    val_split=128, prune_rounds=1, rewind_epoch=1, out=str(tmp_path / "x"))
    data = load_dataset("synthetic", val_split=128)
    source_cfg = METHODS["lottery"].check_source(cfg, data.input_shape)
    return METHODS["lottery"].start(Context(cfg, data, tmp_path / "x", source_cfg, verbose=0))


def test_lottery_rewinds_survivors_to_the_early_weights(tmp_path, dense_run):
    early, _ = build_model("small_cnn", "dense", 1.0, input_shape=(28, 28, 1))
    early.load_weights(RunDir(dense_run).snapshot(1))
    final, _ = build_model("small_cnn", "dense", 1.0, input_shape=(28, 28, 1))
    final.load_weights(dense_run / "best.weights.h5")
    w_early, w_final = kernels(early), kernels(final)
    assert any(np.any(w_early[k] != w_final[k]) for k in w_early)  # the dense run did move its weights

    rewound = _lottery_start(tmp_path, dense_run)
    layers_r = sparse_layers(rewound.net)
    magnitudes = [np.abs(w_final[layer.name]) for layer in layers_r]
    expected = magnitude_masks(magnitudes, rewound.allocation)  # the mask ranks the *final* dense weights
    for layer_r, mask in zip(layers_r, expected):
        k_r = keras.ops.convert_to_numpy(layer_r.kernel)
        np.testing.assert_array_equal(k_r != 0, mask)
        np.testing.assert_allclose(k_r[mask], np.where(np.abs(w_early[layer_r.name][mask]) < 1e-12,
                                                       np.sign(w_early[layer_r.name][mask]) * 1e-12,
                                                       w_early[layer_r.name][mask]), rtol=0, atol=1e-12)


def test_a_ticket_rewinds_from_a_collected_source_as_from_its_run_directory(tmp_path, dense_run):
    # what training.reproduce keeps of a source on a new machine: its archive, metrics and rewind-epoch weights
    from training.archive import main as archive

    collected = RunDir(tmp_path / "collected")
    assert archive([str(dense_run), "--out", str(tmp_path / "network.npz")]) == 0
    collected.snapshot(1).parent.mkdir(parents=True)
    shutil.copyfile(tmp_path / "network.npz", collected.archive)
    shutil.copyfile(RunDir(dense_run).metrics, collected.metrics)
    shutil.copyfile(RunDir(dense_run).snapshot(1), collected.snapshot(1))
    from_run = _lottery_start(tmp_path / "a", dense_run).net
    from_archive = _lottery_start(tmp_path / "b", collected.path).net
    for a, b in zip(sparse_layers(from_run), sparse_layers(from_archive)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a.kernel), keras.ops.convert_to_numpy(b.kernel))


def _masks_and_kernels(run_dir):
    net = keras.models.load_model(run_dir / "model.keras")
    return {layer.name: (keras.ops.convert_to_numpy(layer.theta) > 0, keras.ops.convert_to_numpy(layer.kernel))
            for layer in sparse_layers(net)}


def test_reinit_trains_exactly_the_rewound_tickets_masks_from_a_fresh_start(tmp_path, dense_run):
    ticket, control = tmp_path / "ticket", tmp_path / "reinit"
    common = FAST + ["--method", "lottery", "--connectivity", "0.05", "--max-steps", "3"]
    assert main(common + ["--from", str(dense_run), "--prune-rounds", "2", "--round-epochs", "1",
                          "--out", str(ticket)]) == 0
    assert main(common + ["--from", str(ticket), "--reinit", "--out", str(control)]) == 0
    a, b = _masks_and_kernels(ticket), _masks_and_kernels(control)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0])  # identical masks (a Jaccard index of 1)
    assert any(not np.allclose(a[n][1][a[n][0]], b[n][1][b[n][0]]) for n in a)  # but other weights
    assert _metrics(control)["method"]["restart"].startswith("fresh initialisation")


@pytest.mark.parametrize("source", ["dense", "other_connectivity"])
def test_reinit_refuses_a_source_that_is_not_a_matching_ticket(tmp_path, dense_run, source, capsys):
    if source == "dense":
        src = dense_run
    else:
        src = tmp_path / "ticket"
        assert main(FAST + ["--method", "lottery", "--connectivity", "0.1", "--max-steps", "2", "--from",
                            str(dense_run), "--prune-rounds", "1", "--out", str(src)]) == 0
    capsys.readouterr()
    assert main(FAST + ["--method", "lottery", "--connectivity", "0.05", "--reinit", "--from", str(src),
                        "--out", str(tmp_path / "c")]) == 2
    assert "--reinit" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_hydra_keeps_k_per_layer_by_default(tmp_path, dense_run):
    out = tmp_path / "hydra"
    assert main(FAST + ["--method", "hydra", "--from", str(dense_run), "--connectivity", "0.05", "--score-epochs",
                        "1", "--max-steps", "2", "--out", str(out)]) == 0
    metrics = _metrics(out)
    _, allocation = build_model("small_cnn", "random", 0.05, "layer")
    assert [v["active"] for v in metrics["connectivity"]["layers"].values()] == list(allocation.budgets)
    assert metrics["config"]["effective_budget"] == "layer" and metrics["config"]["budget"] is None


@pytest.mark.parametrize("small_name,large_name,shape", [("small_cnn", "small_cnn_x2", (28, 28, 1)),
                                                         ("wrn28_2", "wrn28_4", (8, 8, 3))])
def test_iwi_inherits_the_small_weights_exactly_where_documented(small_name, large_name, shape):
    small, _ = build_model(small_name, "bcs", 0.1, seed=1, input_shape=shape)
    # non-trivial BatchNorm statistics, so their copy is tested too
    for layer in small.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for v in layer.weights:
                v.assign(np.random.default_rng(0).uniform(0.5, 1.5, size=v.shape).astype("float32"))
    large, _ = build_model(large_name, "dense", 1.0, seed=2, input_shape=shape)
    fresh = kernels(large)
    inherit_weights(small, large)
    positions = inherited_positions(small, large)
    w_small, w_large = kernels(small), kernels(large)
    for name, where in positions.items():
        np.testing.assert_array_equal(np.sort(w_large[name][where]), np.sort(w_small[name].ravel()))
        assert np.count_nonzero(w_large[name][where]) == np.count_nonzero(w_small[name])  # pruned stay 0
        c_out = w_small[name].shape[-1]
        new_out = w_large[name][..., c_out:]
        np.testing.assert_array_equal(new_out, fresh[name][..., c_out:])  # new units keep their fresh init
        assert np.all(w_large[name][..., :c_out][~where[..., :c_out]] == 0)  # old units read nothing new
    x = np.random.default_rng(1).uniform(size=(4,) + shape).astype("float32")
    np.testing.assert_allclose(np.asarray(large(x, training=False)), np.asarray(small(x, training=False)),
                               rtol=1e-4, atol=1e-4)


def test_a_lottery_run_killed_inside_a_pruning_round_resumes_to_the_uninterrupted_result(whole_and_killed,
                                                                                        capsys, dense_run):
    flags = FAST + ["--method", "lottery", "--from", str(dense_run), "--connectivity", "0.05", "--prune-rounds", "2",
                    "--round-epochs", "2", "--epochs", "1"]
    whole, split = whole_and_killed(main, flags)
    assert not (split / "checkpoint").exists()  # killed inside round 1
    capsys.readouterr()
    assert main(flags + ["--out", str(split), "--resume"]) == 0
    assert f"resuming {split / 'phases' / 'round1'} after epoch 1" in capsys.readouterr().out
    a, b = _metrics(whole), _metrics(split)
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k} for e in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert (a["test_clean_acc"], a["test_pgd2_acc"]) == (b["test_clean_acc"], b["test_pgd2_acc"])
    assert _exact_budget(b)
