import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from bcs_tf.data import synthetic_arrays
from bcs_tf.robustness import Evaluator
from bcs_tf.robustness.art import VectorisedDLRLoss
from bcs_run.attacks import order_check
from training.evaluate import markdown_table


def _quantize(x):
    # Forward: inputs rounded to 4 levels; backward: exactly zero gradient (the classic masking mistake).
    return x * 0.0 + tf.stop_gradient(tf.round(x * 4.0) / 4.0)


def _model(masked):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8, 8, 1))]
    if masked:
        layers.append(keras.layers.Lambda(_quantize))
    layers += [keras.layers.Flatten(), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    (x, y), (xt, yt) = synthetic_arrays(1024, 64, shape=(8, 8, 1), seed=2)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=5, batch_size=64, verbose=0)
    return model, xt, yt


def _evaluate(model, x, y):
    ev = Evaluator(model, eps=0.3, num_classes=10, batch_size=64, square_queries=300, verbose=0)
    results = {}
    for name in ("clean", "fgsm", "pgd50", "pgd100", "autoattack"):
        acc, seconds = ev.run(name, x, y)
        results[name] = {"accuracy": acc, "seconds_per_1000": 1000 * seconds / len(x)}
    return results


@pytest.mark.parametrize("masked", [False, True])
def test_order_check_flags_the_gradient_masked_model_only(masked):
    model, x, y = _model(masked)
    results = _evaluate(model, x, y)
    assert results["clean"]["accuracy"] > 0.7
    problems = order_check(results, len(x))
    if masked:
        assert problems, results  # gradient attacks fail, the black-box part of AutoAttack does not
    else:
        assert not problems, (problems, results)


def test_order_check_catches_a_reversed_order():
    results = {"clean": {"accuracy": 0.80}, "fgsm": {"accuracy": 0.30}, "pgd50": {"accuracy": 0.45}}
    assert any("pgd50" in p for p in order_check(results, 10000))
    assert not order_check({"clean": {"accuracy": 0.8}, "fgsm": {"accuracy": 0.5}}, 10000)


def test_table_has_the_paper_rows():
    results = {k: {"accuracy": 0.5, "seconds_per_1000": 1.0} for k in ("clean", "fgsm", "pgd50", "bb")}
    table = markdown_table(results, 0.1, 100)
    assert "| Clean |" in table and "| B&B∞ |" in table and "| PGD-50 |" in table


def test_cli_writes_json_and_table_and_protects_existing_results(tmp_path, capsys):
    import json

    from training.evaluate import main as eval_main
    from training.run import main as train_main

    run = tmp_path / "run"
    assert train_main(["--dataset", "synthetic", "--val-split", "128", "--attack-steps", "1", "--eval-steps", "1",
                       "--max-steps", "2", "--verbose", "0", "--out", str(run)]) == 0
    flags = [str(run), "--attacks", "clean,fgsm,pgd5,apgd-ce", "--n-examples", "32", "--verbose", "0"]
    assert eval_main(flags) == 0
    report = json.loads((run / "eval.json").read_text())
    assert set(report["attacks"]) == {"clean", "fgsm", "pgd5", "apgd-ce"}
    assert all(r["n"] == 32 and r["seconds_per_1000"] > 0 for r in report["attacks"].values())
    assert "| Clean |" in (run / "eval.md").read_text()
    assert eval_main(flags) == 2  # eval.json exists
    assert "--overwrite" in capsys.readouterr().err
    saved = json.loads((run / "eval.json").read_text())["attacks"]
    assert eval_main(flags[:2] + ["clean,fgsm,pgd5,apgd-ce,fgsm"] + flags[3:] + ["--resume"]) == 0
    assert "kept from" in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text())["attacks"] == saved  # nothing recomputed
    assert eval_main(flags + ["--resume", "--eps", "0.2"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert json.loads((run / "eval.json").read_text())["attacks"] == saved  # a refused resume writes nothing
    assert eval_main([str(run), "--attacks", "clean,cw", "--overwrite", "--verbose", "0"]) == 2
    assert "unknown attack" in capsys.readouterr().err
    # a second report beside the first, e.g. a costly attack on fewer examples
    assert eval_main([str(run), "--attacks", "clean,pgd5", "--n-examples", "16", "--verbose", "0", "--name",
                      "eval_small"]) == 0
    assert json.loads((run / "eval_small.json").read_text())["n_examples"] == 16
    assert json.loads((run / "eval.json").read_text())["attacks"] == saved
    assert eval_main(flags + ["--name", "../x"]) == 2 and "--name" in capsys.readouterr().err
    # --weights last: the newest training checkpoint's network (here the selected one too), in its own report
    assert eval_main([str(run), "--weights", "last", "--attacks", "clean", "--n-examples", "32", "--verbose",
                      "0"]) == 0
    last = json.loads((run / "eval_last.json").read_text())
    assert last["weights"] == "last" and last["attacks"]["clean"]["accuracy"] == saved["clean"]["accuracy"]
    from training.archive import main as archive_main

    assert archive_main([str(run), "--weights", "last", "--verbose", "0"]) == 2  # network.npz: the selected one
    assert "--out" in capsys.readouterr().err
    archived = tmp_path / "last" / "network.npz"
    assert archive_main([str(run), "--weights", "last", "--out", str(archived), "--verbose", "0"]) == 0
    from bcs_tf.archive import load_archive

    assert load_archive(archived)[0]["weights"] == "last"
    (run / "checkpoint").rename(tmp_path / "away")
    assert eval_main([str(run), "--weights", "last", "--overwrite", "--verbose", "0"]) == 2
    assert "no training checkpoint" in capsys.readouterr().err
    model = (run / "model.keras").read_bytes()
    (run / "model.keras").write_bytes(model[:len(model) // 2])  # a truncated copy: Keras says "File not found"
    assert eval_main(flags + ["--name", "eval_cut"]) == 2
    assert f"corrupt model {run / 'model.keras'}" in capsys.readouterr().err
    assert not (run / "eval_cut.json").exists()


def test_the_network_of_a_checkpoint_loads_into_the_saved_model(tmp_path):
    from bcs_tf.checkpoint import load_network_from_checkpoint
    from bcs_tf.errors import CheckpointError
    from training.run import main as train_main

    run = tmp_path / "run"
    assert train_main(["--dataset", "synthetic", "--val-split", "128", "--attack-steps", "1", "--eval-steps", "1",
                       "--max-steps", "2", "--verbose", "0", "--out", str(run)]) == 0
    net = keras.models.load_model(run / "model.keras")  # the selected network: here also the newest checkpoint's
    reference = [w.numpy().copy() for w in net.weights]
    for w in net.weights:
        w.assign(tf.zeros_like(w))
    load_network_from_checkpoint(net, run / "checkpoint")
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(reference, net.weights))
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    (run / "checkpoint" / state["weights"]).write_bytes(b"not hdf5")
    with pytest.raises(CheckpointError, match="corrupt or incompatible checkpoint"):
        load_network_from_checkpoint(net, run / "checkpoint")


@pytest.mark.integration  # ART / foolbox, tens of seconds
def test_brendel_bethge_runs_with_starting_points_and_is_no_weaker_than_clean():
    model, x, y = _model(masked=False)
    ev = Evaluator(model, eps=0.3, num_classes=10, batch_size=64, verbose=0, bb_steps=20)
    acc_bb, _ = ev.run("bb", x, y)
    acc_clean, _ = ev.run("clean", x, y)
    assert acc_bb <= acc_clean


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_vectorised_dlr_loss_equals_arts(reduction):
    import numpy as np
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(10)])
    classifier = TensorFlowV2Classifier(model, nb_classes=10, input_shape=(4,),
                                        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    arts = AutoProjectedGradientDescent(classifier, loss_type="difference_logits_ratio").estimator._loss_object
    ours = VectorisedDLRLoss()
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(64, 10)), tf.float32)
    labels = rng.integers(0, 10, 64)
    labels[:16] = np.argmax(logits[:16], 1)  # the label is the top class for some rows, not for others
    onehot = tf.one_hot(labels, 10)
    arts.reduction = ours.reduction = reduction
    np.testing.assert_allclose(ours(onehot, logits), arts(onehot, logits), rtol=1e-5)


def test_standard_autoattack_reuses_its_components_and_is_the_worst_case():
    import numpy as np

    model, x, y = _model(masked=False)
    ev = Evaluator(model, eps=0.3, num_classes=10, batch_size=64, square_queries=100, verbose=0)
    results = {name: ev.run(name, x, y)[0] for name in ("clean", "apgd-ce", "apgd-t")}
    ran = []
    original = ev.resolve
    ev.resolve = lambda name: ran.append(name) or original(name)
    aa, _ = ev.run("autoattack", x, y)
    assert ran == ["square"]  # APGD-CE and APGD-T outcomes were reused
    assert aa <= min(results.values())
    robust = ev._outcomes["autoattack"][0]
    for name in ("apgd-ce", "apgd-t"):
        assert not np.any(robust & ~ev._outcomes[name][0])
    # each part's share: the accuracy left after it, falling to AutoAttack's own
    stages = ev.stages
    assert list(stages) == ["clean", "apgd-ce", "apgd-t", "square"]
    assert stages["clean"] >= stages["apgd-ce"] >= stages["apgd-t"] >= stages["square"] == aa
    assert stages["apgd-ce"] == results["apgd-ce"]


@pytest.mark.integration  # ART / foolbox, tens of seconds
def test_arts_autoattack_class_runs_and_breaks_examples():
    model, x, y = _model(masked=False)
    ev = Evaluator(model, eps=0.3, num_classes=10, batch_size=64, square_queries=50, verbose=0,
                   autoattack="art")
    x, y = x[:32], y[:32]
    aa, _ = ev.run("autoattack", x, y)
    assert aa < ev.run("clean", x, y)[0]


@pytest.mark.integration  # ART / foolbox, tens of seconds
def test_in_graph_square_is_at_least_as_strong_as_arts():
    import math

    import numpy as np

    from bcs_tf.robustness.square import SquareAttack, p_schedule

    # the authors' schedule: p_init halved after 10, 50, 200, … of 10,000 queries
    assert [float(p_schedule(i, 10000, 0.8)) for i in (0, 10, 11, 51, 8001, 9999)] == \
        pytest.approx([0.8, 0.8, 0.4, 0.2, 0.8 / 512, 0.8 / 512])
    model, x, y = _model(masked=False)
    eps = 0.2
    art = Evaluator(model, eps=eps, num_classes=10, batch_size=64, square_queries=300, verbose=0, square="art")
    ours = Evaluator(model, eps=eps, num_classes=10, batch_size=64, square_queries=300, verbose=0, square="tf")
    acc_art, _ = art.run("square", x, y)
    acc_tf, _ = ours.run("square", x, y)
    noise = 2 * math.sqrt(max(acc_art * (1 - acc_art), 0.01) / len(x))
    assert acc_tf <= acc_art + noise, (acc_tf, acc_art)
    assert acc_tf < art.run("clean", x, y)[0]  # it does find adversarial examples
    x_adv = SquareAttack(ours.predict, eps, n_queries=300)(x, y)
    assert np.abs(x_adv - x).max() <= eps + 1e-6 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.integration  # ART, tens of seconds
@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-t"])
def test_in_graph_apgd_is_at_least_as_strong_as_arts(attack):
    import math

    from bcs_tf.robustness.apgd import checkpoints

    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # the authors' schedule for 100 iterations
    model, x, y = _model(masked=False)
    eps = 0.1
    art = Evaluator(model, eps=eps, num_classes=10, batch_size=64, verbose=0, apgd="art")
    ours = Evaluator(model, eps=eps, num_classes=10, batch_size=64, verbose=0, apgd="tf")
    acc_art, _ = art.run(attack, x, y)
    acc_tf, _ = ours.run(attack, x, y)
    noise = 2 * math.sqrt(max(acc_art * (1 - acc_art), 0.01) / len(x))
    assert acc_tf <= acc_art + noise, (acc_tf, acc_art)
    assert acc_tf < ours.run("clean", x, y)[0]  # it does find adversarial examples


def _reference_apgd(x, y, loss_grad, eps, n_iter, x_adv, rho=0.75):
    """A NumPy transcription of fra31/auto-attack's L∞ ``attack_single_run`` loop (one restart) from the start
    ``x_adv``, with ``loss_grad(x) → (loss, gradient)`` per example; returns the best loss and the final step
    size per example."""
    n = len(x)
    project = lambda z: np.clip(np.clip(z, x - eps, x + eps), 0.0, 1.0)  # noqa: E731
    k, k_min, decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    x_best, loss_steps = x_adv.copy(), np.zeros((n_iter, n), np.float32)
    loss, grad = loss_grad(x_adv)
    grad_best, loss_best = grad.copy(), loss.copy()
    step = np.full((n,) + (1,) * (x.ndim - 1), 2.0 * eps, np.float32)
    x_old, counter3 = x_adv.copy(), 0
    best_last, reduced_last = loss_best.copy(), np.ones(n, bool)
    for i in range(n_iter):
        grad2, x_old, a = x_adv - x_old, x_adv.copy(), 0.75 if i > 0 else 1.0
        x1 = project(x_adv + step * np.sign(grad))
        x_adv = project(x_adv + (x1 - x_adv) * a + grad2 * (1 - a))
        loss, grad = loss_grad(x_adv)
        loss_steps[i] = loss
        better = loss > loss_best
        x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss[better]
        counter3 += 1
        if counter3 == k:
            t = sum((loss_steps[i - c] > loss_steps[i - c - 1]).astype(np.float32) for c in range(k))
            osc = (t <= k * rho) | (~reduced_last & (best_last >= loss_best))
            reduced_last, best_last = osc, loss_best.copy()
            step[osc] /= 2.0
            x_adv[osc], grad[osc] = x_best[osc], grad_best[osc]
            k, counter3 = max(k - decr, k_min), 0
    return loss_best, step.ravel()


@pytest.mark.parametrize("loss_name", ["ce_loss", "targeted_dlr_loss"])
def test_in_graph_apgd_follows_the_authors_step_size_schedule(loss_name):
    """Same start, same model: the in-graph APGD halves its step exactly when a transcription of the authors'
    loop does, and reaches the same best loss. A ``<`` halving test changes the final step of ≈ 3% of the
    examples under CE; comparing the first step with the random start's loss instead of 0 changes it under the
    targeted DLR loss, which is negative."""
    from bcs_tf.robustness import apgd
    from bcs_tf.robustness.apgd import APGD

    rng = np.random.default_rng(0)
    n = 1024
    x = rng.uniform(0, 1, (n, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    w = rng.normal(size=(36, 32)).astype(np.float32)
    v = rng.normal(size=(32, 10)).astype(np.float32)
    eps, n_iter = 0.1, 100
    loss = getattr(apgd, loss_name)
    predict = lambda z: tf.sin(tf.reshape(z, [-1, 36]) @ w) @ v  # noqa: E731 (a wavy loss: halving matters)
    target = (y + 1 + rng.integers(0, 9, n).astype(np.int32)) % 10

    def loss_grad(z):
        z = tf.constant(z)
        with tf.GradientTape() as tape:
            tape.watch(z)
            value = loss(predict(z), tf.constant(y), tf.constant(target))
        return value.numpy(), tape.gradient(value, z).numpy()

    attack = APGD(predict, eps, n_iter, loss, seed=3)
    t = tf.random.stateless_uniform(x.shape, [3, 1], -1.0, 1.0).numpy()
    start = np.clip(np.clip(x + eps * t / np.abs(t.reshape(n, -1)).max(1)[:, None, None, None], x - eps, x + eps),
                    0, 1)
    _, best, step = attack.run(x, y, target)
    best_ref, step_ref = _reference_apgd(x, y, loss_grad, eps, n_iter, start)
    assert np.mean(step == step_ref) >= 0.99  # float32 round-off may flip a near-tie in a few examples
    np.testing.assert_allclose(best, best_ref, rtol=1e-4, atol=2e-4)


def test_the_run_layers_attack_names_are_the_evaluators():
    from bcs_run import attacks
    from bcs_tf.robustness import evaluator

    assert attacks.ATTACKS == Evaluator.ATTACKS
    assert set(attacks.ATTACK_LABELS) - {"pgd50", "pgd100"} == set(Evaluator.ATTACKS)
    for name in ("pgd1", "pgd50", "pgd0", "pgd", "pgdx", "apgd-ce"):
        assert attacks.pgd_steps(name) == evaluator.pgd_steps(name)
    ev = Evaluator(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]), 0.1, 3, verbose=0)
    for name in Evaluator.ATTACKS + ("pgd7",):
        assert callable(ev.resolve(name))
    with pytest.raises(Exception, match="unknown attack"):
        ev.resolve("fab")


def test_in_graph_square_attacks_a_batch_of_one():
    # The full preset's mixed-batch AT Fixed 99% evaluation failed here: with one survivor, the model's unknown
    # batch size broadcast against the batch of one changed the loop variables' shapes inside tf.while_loop.
    from bcs_tf.robustness.square import SquareAttack

    model, x, y = _model(masked=False)
    ev = Evaluator(model, eps=0.3, num_classes=10, batch_size=64, square_queries=100, verbose=0, square="tf")
    x_adv = SquareAttack(ev.predict, 0.3, n_queries=100, chunk=40)(x[:1], y[:1])
    assert x_adv.shape == x[:1].shape and np.abs(x_adv - x[:1]).max() <= 0.3 + 1e-6
    acc, _ = ev.run("square", x[:1], y[:1])
    assert acc in (0.0, 1.0)
