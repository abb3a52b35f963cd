import keras
import numpy as np

from bcs_tf.robustness.attacks import AttackConfig
from bcs_tf.checkpoint import load_checkpoint, save_checkpoint
from bcs_tf.connectivity import optimizer_slots
from bcs_tf.data import make_pipeline, synthetic_arrays
from bcs_tf.models import build_model
from bcs_tf.objectives import make_objective
from bcs_tf.trainer import RobustTrainer


def _trainer(objective="trades", seed=0):
    net, alloc = build_model("small_cnn", "bcs", 0.05, "global", seed=seed, input_shape=(12, 12, 1))
    trainer = RobustTrainer(net, make_objective(objective), AttackConfig(0.1, 0.05, 3), allocation=alloc,
                            temperature=1e-8, seed=seed)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.01), jit_compile=False)
    trainer.prepare()
    return trainer


def test_short_bcs_trades_run_on_synthetic_data_lowers_the_loss():
    (x, y), _ = synthetic_arrays(512, 64, shape=(12, 12, 1), seed=0)
    trainer = _trainer()
    hist = trainer.fit(make_pipeline(x, y, 64, shuffle=True), epochs=4, verbose=0).history
    assert hist["loss"][-1] < 0.6 * hist["loss"][0], hist["loss"]
    assert hist["clean_acc"][-1] > 0.5


def test_checkpoint_restores_weights_optimizer_slots_and_rng(tmp_path):
    (x, y), _ = synthetic_arrays(128, 16, shape=(12, 12, 1), seed=1)
    a = _trainer("at")
    a.fit(make_pipeline(x, y, 32), epochs=1, verbose=0)
    save_checkpoint(a, tmp_path, {"epoch": 1})
    b = _trainer("at", seed=5)  # different initialisation and RNG seeds
    state = load_checkpoint(b, tmp_path)
    assert state["epoch"] == 1
    for va, vb in zip(a.net.weights, b.net.weights):
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))
    theta_a, theta_b = a.sampler.layers[0].theta, b.sampler.layers[0].theta
    for sa, sb in zip(optimizer_slots(a.optimizer, theta_a), optimizer_slots(b.optimizer, theta_b)):
        assert np.any(np.asarray(sa) != 0)
        np.testing.assert_array_equal(np.asarray(sa), np.asarray(sb))
    np.testing.assert_array_equal(np.asarray(a.sampler_seed.state), np.asarray(b.sampler_seed.state))
    # Continuing both from the same state gives the same next step.
    a.train_on_batch(x[:32], y[:32])
    b.train_on_batch(x[:32], y[:32])
    for va, vb in zip(a.net.weights, b.net.weights):
        np.testing.assert_allclose(np.asarray(va), np.asarray(vb), atol=1e-6)
