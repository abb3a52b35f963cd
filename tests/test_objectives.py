import numpy as np
import pytest
import tensorflow as tf

from bcs_tf.errors import ConfigError
from bcs_tf.objectives import kl_divergence, make_objective

NAT = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]], "float32")
ADV = np.array([[0.0, 1.0, -1.0], [0.5, 1.5, 0.0]], "float32")
Y = np.array([0, 2], "int32")


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _ce(z, y):
    return -np.log(_softmax(z)[np.arange(len(y)), y])


def _fixed(table):
    return lambda x: tf.constant(table[int(x)])


def test_kl_matches_hand_computation():
    p, q = _softmax(NAT), _softmax(ADV)
    np.testing.assert_allclose(kl_divergence(NAT, ADV), np.sum(p * np.log(p / q), 1), rtol=1e-5)


def test_trades_loss_reference():
    forward = _fixed({0: NAT, 1: ADV})
    loss, _, _ = make_objective("trades", beta=6.0).loss(forward, 0, Y, 1)
    p, q = _softmax(NAT), _softmax(ADV)
    expected = _ce(NAT, Y).mean() + 6.0 * np.sum(p * np.log(p / q), 1).mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_at_and_natural_loss_reference():
    forward = _fixed({0: NAT, 1: ADV})
    at, _, _ = make_objective("at").loss(forward, 0, Y, 1)
    nat, _, _ = make_objective("natural").loss(forward, 0, Y, None)
    np.testing.assert_allclose(float(at), _ce(ADV, Y).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(nat), _ce(NAT, Y).mean(), rtol=1e-5)


def test_unknown_objective_and_bad_beta():
    with pytest.raises(ConfigError, match="objective"):
        make_objective("madry")
    with pytest.raises(ConfigError, match="beta"):
        make_objective("trades", beta=-1)


def _attacked(objective):
    """A small tanh network, a batch of 32 inputs, and the batch attacked by ``objective`` (ε = 0.2, 10 steps)."""
    import keras

    from bcs_tf.robustness.attacks import AttackConfig
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
    x = tf.constant(np.random.default_rng(0).uniform(size=(32, 6)), tf.float32)
    y = tf.zeros([32], tf.int32)
    return model, x, y, make_objective(objective).adversarial(model, x, y, AttackConfig(0.2, 0.05, 10))


def test_trades_attack_increases_its_own_kl():
    model, x, y, x_adv = _attacked("trades")
    noise = x + tf.random.uniform(x.shape, -0.2, 0.2)
    assert float(tf.reduce_mean(kl_divergence(model(x), model(x_adv)))) > float(
        tf.reduce_mean(kl_divergence(model(x), model(tf.clip_by_value(noise, 0, 1)))))


def test_mart_loss_reference():
    forward = _fixed({0: NAT, 1: ADV})
    loss, _, _ = make_objective("mart", beta=6.0).loss(forward, 0, Y, 1)
    p_nat, p_adv = _softmax(NAT), _softmax(ADV)
    masked = p_adv.copy()
    masked[np.arange(2), Y] = -1
    wrong = masked.argmax(1)  # most likely wrong class under attack
    loss_adv = _ce(ADV, Y).mean() + np.mean(-np.log(1.0001 - p_adv[np.arange(2), wrong] + 1e-12))
    kl = np.sum(p_nat * (np.log(p_nat) - np.log(p_adv + 1e-12)), 1)
    expected = loss_adv + 6.0 * np.mean(kl * (1.0000001 - p_nat[np.arange(2), Y]))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_mixed_batch_at_attacks_only_the_first_half():
    import keras

    from bcs_tf.robustness.attacks import AttackConfig
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    x = tf.constant(np.random.default_rng(0).uniform(size=(8, 6)), tf.float32)
    y = tf.zeros([8], tf.int32)
    x_mix = make_objective("mat").adversarial(model, x, y, AttackConfig(0.2, 0.05, 5))
    assert np.abs(np.asarray(x_mix[:4]) - np.asarray(x[:4])).max() > 0.01
    np.testing.assert_array_equal(np.asarray(x_mix[4:]), np.asarray(x[4:]))
    loss, _, _ = make_objective("mat").loss(model, x, y, x_mix)
    np.testing.assert_allclose(float(loss), float(tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(x_mix)))), rtol=1e-6)


def test_mart_attack_increases_cross_entropy():
    from bcs_tf.robustness.attacks import cross_entropy
    model, x, y, x_adv = _attacked("mart")
    assert float(tf.reduce_mean(cross_entropy(model(x_adv), y))) > float(tf.reduce_mean(cross_entropy(model(x), y)))
