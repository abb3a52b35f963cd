import keras
import numpy as np
import pytest
import tensorflow as tf
from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent as ch_pgd

from bcs_tf.robustness.attacks import cross_entropy, fgsm, pgd, pgd_restarts
from bcs_tf.data import synthetic_arrays


@pytest.fixture(scope="module")
def trained():
    """A small dense CNN trained for a few epochs on the synthetic task (clean accuracy well above chance)."""
    keras.utils.set_random_seed(0)
    (x, y), (xt, yt) = synthetic_arrays(1024, 256, shape=(12, 12, 1), seed=3)
    model = keras.Sequential([
        keras.Input((12, 12, 1)), keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=4, batch_size=64, verbose=0)
    assert model.evaluate(xt, yt, verbose=0)[1] > 0.8
    return model, xt, yt


def _acc(model, x, y):
    return float(np.mean(np.argmax(np.asarray(model(x)), 1) == y))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_pgd_increases_loss_and_stays_in_ball_and_range(trained, norm, eps):
    model, x, y = trained
    x_adv = np.asarray(pgd(model, x, y, eps, eps / 4, 10, norm=norm, seed=1))
    delta = (x_adv - x).reshape(len(x), -1)
    bound = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert bound.max() <= eps + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    loss_clean = np.mean(cross_entropy(model(x), y))
    loss_adv = np.mean(cross_entropy(model(x_adv), y))
    assert loss_adv > loss_clean + 0.1
    assert _acc(model, x_adv, y) < _acc(model, x, y)


def test_fgsm_is_one_signed_step(trained):
    model, x, y = trained
    x_adv = np.asarray(fgsm(model, x, y, 0.05))
    moved = np.abs(x_adv - x)
    inside = (x > 0.05) & (x < 0.95)
    np.testing.assert_allclose(moved[inside & (moved > 0)], 0.05, atol=1e-6)


def test_our_pgd_is_at_least_as_strong_as_cleverhans(trained):
    model, x, y = trained
    eps, step, steps = 0.08, 0.02, 10
    ours = _acc(model, np.asarray(pgd(model, x, y, eps, step, steps, seed=0)), y)
    theirs = _acc(model, np.asarray(ch_pgd(model, x, eps, step, steps, np.inf, clip_min=0.0, clip_max=1.0, y=y,
                                           rand_init=True, rand_minmax=eps)), y)
    assert ours <= theirs + 0.02, (ours, theirs)


def test_restarts_keep_the_worst_case(trained):
    model, x, y = trained
    single = _acc(model, np.asarray(pgd_restarts(model, x, y, 0.06, 0.015, 5, restarts=1, seed=2)), y)
    multi = _acc(model, np.asarray(pgd_restarts(model, x, y, 0.06, 0.015, 5, restarts=4, seed=2)), y)
    assert multi <= single


def test_pgd_inside_tf_function_matches_shapes(trained):
    model, x, y = trained
    gen = keras.random.SeedGenerator(0)

    @tf.function
    def attack(xb, yb):
        return pgd(model, xb, yb, 0.1, 0.025, tf.constant(3), seed=gen)

    out = attack(tf.constant(x[:8]), tf.constant(y[:8]))
    assert out.shape == x[:8].shape
