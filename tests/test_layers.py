import keras
import numpy as np
import pytest

import bcs_tf
from bcs_tf.errors import ConfigError
from bcs_tf.layers import SparseConv2D, SparseDense, sparse_layers
from conftest import tiny_sparse_net


def test_effective_kernel_is_sign_times_relu_theta_and_dormant_exactly_zero():
    layer = SparseDense(16, connectivity=0.25, seed=3)
    layer.build((None, 32))
    theta, sign, kernel = (np.asarray(v) for v in (layer.theta, layer.sign, layer.kernel))
    assert set(np.unique(sign)) == {-1.0, 1.0}
    np.testing.assert_array_equal(kernel, sign * np.maximum(theta, 0))
    assert np.all(kernel[theta <= 0] == 0.0)
    assert np.count_nonzero(theta > 0) == round(0.25 * 32 * 16)


def test_conv_matches_keras_conv_with_the_effective_kernel():
    layer = SparseConv2D(5, 3, strides=2, connectivity=0.5, seed=1)
    x = np.random.default_rng(0).uniform(size=(2, 9, 9, 3)).astype("float32")
    y = np.asarray(layer(x))
    ref = keras.layers.Conv2D(5, 3, strides=2, padding="same", use_bias=False)
    ref.build(x.shape)
    ref.kernel.assign(layer.kernel)
    np.testing.assert_allclose(y, np.asarray(ref(x)), atol=1e-5)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, "x"])
def test_bad_connectivity_is_rejected_with_the_name(bad):
    with pytest.raises(ConfigError, match="connectivity"):
        SparseDense(4, connectivity=bad)


def test_config_round_trip():
    layer = SparseConv2D(7, (3, 1), strides=(2, 1), padding="valid", connectivity=0.3, seed=9, name="c")
    clone = SparseConv2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    net = tiny_sparse_net()
    x = np.random.default_rng(1).uniform(size=(3, 8, 8, 1)).astype("float32")
    path = tmp_path / "m.keras"
    net.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(net(x)), np.asarray(loaded(x)))
    for a, b in zip(sparse_layers(net), sparse_layers(loaded)):
        np.testing.assert_array_equal(np.asarray(a.theta), np.asarray(b.theta))
        np.testing.assert_array_equal(np.asarray(a.sign), np.asarray(b.sign))
    assert isinstance(loaded.get_layer("c1"), bcs_tf.SparseConv2D)


def test_frozen_kernels_reuse_the_effective_kernel_and_restore_it():
    from bcs_tf.layers import frozen_kernels

    net = tiny_sparse_net()
    x = np.random.default_rng(2).uniform(size=(4, 8, 8, 1)).astype("float32")
    live = np.asarray(net(x))
    with frozen_kernels(net):
        np.testing.assert_array_equal(np.asarray(net(x)), live)
        layer = sparse_layers(net)[0]
        layer.theta.assign(layer.theta * 2.0)  # the frozen copy does not follow θ inside the block
        np.testing.assert_array_equal(np.asarray(net(x)), live)
    assert all(l._kernel_override is None for l in sparse_layers(net))
    assert not np.array_equal(np.asarray(net(x)), live)
