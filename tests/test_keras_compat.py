"""Canaries for the private Keras / LiteRT attributes bcs-tf relies on (bcs_tf._keras_compat): each fails with a
message naming the attribute when an upgrade removes or changes it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bcs_tf import _keras_compat as compat
from bcs_tf.models import build_model
from bcs_tf.trainer import RobustTrainer

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("owner,attribute,use", compat.PRIVATE)
def test_every_private_attribute_still_exists(owner, attribute, use):
    if owner == "tf.lite.TFLiteConverter":
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        target = tf.lite.TFLiteConverter.from_keras_model(model)
    elif owner == "keras.optimizers.Optimizer":
        target = keras.optimizers.SGD()
        target.build([keras.Variable(np.zeros(3, np.float32))])
    else:  # an instance: some attributes are set in __init__
        target = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert hasattr(target, attribute), (f"{owner}.{attribute} is gone with this Keras/TensorFlow version; "
                                        f"bcs-tf uses it for {use}: update bcs_tf/_keras_compat.py")


def test_flatten_layers_finds_the_layers_of_nested_models():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="inner_dense")], name="inner")
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2, name="outer_dense")])
    names = [layer.name for layer in compat.flatten_layers(outer)]
    assert "inner_dense" in names and "outer_dense" in names and outer.name not in names, (
        f"keras.Model._flatten_layers no longer lists nested layers ({names}): update bcs_tf/_keras_compat.py")


def test_optimizer_slots_are_found_by_index():
    variables = [keras.Variable(np.zeros(3, np.float32)), keras.Variable(np.zeros((2, 2), np.float32))]
    opt = keras.optimizers.SGD(momentum=0.9)
    opt.build(variables)
    assert [id(v) for v in compat.optimizer_trainable_variables(opt)] == [id(v) for v in variables], (
        "keras optimizer._trainable_variables no longer lists the built variables in order")
    assert compat.optimizer_variable_index(opt, variables[1]) == 1, (
        "keras optimizer._get_variable_index no longer gives a variable's slot index")


def test_the_build_hook_keeps_its_signature_and_builds():
    assert compat.symbolic_build_hook_parameters(keras.Model)[1:] == ("iterator", "data_batch"), (
        "keras.Model._maybe_symbolic_build changed its parameters; RobustTrainer overrides it")
    net, allocation = build_model("small_cnn", "bcs", 0.1, input_shape=(28, 28, 1))
    from bcs_tf.robustness.attacks import AttackConfig
    from bcs_tf.objectives import make_objective

    trainer = RobustTrainer(net, make_objective("at"), AttackConfig(eps=0.1, step_size=0.05, steps=1),
                            allocation=allocation)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01))
    assert compat.distribute_strategy(trainer) is None or hasattr(compat.distribute_strategy(trainer), "scope")
    compat.symbolic_build(trainer, (np.zeros((2, 28, 28, 1), np.float32), np.zeros(2, np.int32)))
    assert trainer.optimizer.built, "keras.Model._symbolic_build no longer builds the optimizer"
