import keras
import numpy as np
import pytest

from bcs_tf.connectivity import allocate_budget, connectivity_report
from bcs_tf.errors import ConfigError
from bcs_tf.models import MODELS, build_model


def test_global_budget_counts_sum_exactly_and_keep_the_profile_shape():
    sizes = [144, 4608, 18432, 401408, 1280]
    alloc = allocate_budget(sizes, 0.01, "global", profile=[0.6, 0.2, 0.005, 0.005, 0.6])
    assert alloc.budgets == (int(0.01 * sum(sizes)),)
    assert sum(alloc.counts) == alloc.budgets[0]
    frac = np.array(alloc.counts) / np.array(sizes)
    assert frac[0] > frac[1] > frac[3] and frac[4] > frac[3]
    assert all(1 <= c <= n for c, n in zip(alloc.counts, sizes))


def test_global_budget_with_saturated_layers():
    alloc = allocate_budget([10, 1000], 0.5, "global", profile=[1.0, 0.01])
    assert alloc.counts[0] == 10 and sum(alloc.counts) == 505


def test_layer_budget_is_round_c_n_per_layer():
    alloc = allocate_budget([100, 37, 5], 0.1, "layer")
    assert alloc.counts == (10, 4, 1) and alloc.budgets == alloc.counts and len(alloc.groups) == 3


@pytest.mark.parametrize("c", [0.0, 1.01, -1])
def test_bad_connectivity(c):
    with pytest.raises(ConfigError, match="connectivity"):
        allocate_budget([10], c)


@pytest.mark.parametrize("budget", ["global", "layer"])
def test_small_cnn_starts_exactly_at_budget(budget):
    net, alloc = build_model("small_cnn", "bcs", 0.01, budget)
    report = connectivity_report(net)
    assert [v["active"] for v in report["layers"].values()] == list(alloc.counts)
    assert report["active"] == sum(alloc.budgets)


def test_dense_method_and_full_connectivity_give_plain_keras_layers():
    for method, c in (("dense", 0.01), ("bcs", 1.0)):
        net, alloc = build_model("small_cnn", method, c)
        assert alloc is None and connectivity_report(net)["layers"] == {}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("c", [0.1, 0.01])
def test_every_model_builds_with_the_exact_budget(name, c):
    net, alloc = build_model(name, "bcs", c, "global")
    report = connectivity_report(net)
    assert report["active"] == alloc.budgets[0] == int(c * report["size"])
    layers = list(report["layers"].values())
    # The authors' profile: first and output layers denser than the middle of the network.
    assert layers[0]["connectivity"] > 2 * c and layers[-1]["connectivity"] > 2 * c
    x = np.zeros((2,) + MODELS[name].input_shape, "float32")
    assert net(x).shape == (2, 10)


def test_too_small_input_is_a_config_error():
    with pytest.raises(ConfigError, match="input"):
        build_model("vgg16", "bcs", 0.1, input_shape=(4, 4, 3))


def test_mixed_bfloat16_model_computes_in_bfloat16_with_float32_variables_and_logits():
    from bcs_tf.layers import sparse_layers

    net, alloc = build_model("small_cnn", "bcs", 0.01, precision="mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"
    layers = sparse_layers(net)
    assert layers[0].compute_dtype == "bfloat16" and layers[-1].compute_dtype == "float32"
    assert all(v.dtype == "float32" for v in net.weights)
    assert sum(layer.active_count() for layer in layers) == alloc.budgets[0]
    x = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype("float32")
    logits = net(x)
    assert logits.dtype == "float32"
    net32, _ = build_model("small_cnn", "bcs", 0.01)
    net32.set_weights(net.get_weights())
    np.testing.assert_allclose(np.asarray(logits), np.asarray(net32(x)), atol=0.1 * float(np.abs(logits).max()))
