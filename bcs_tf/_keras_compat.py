"""Every private Keras (and LiteRT converter) attribute bcs-tf relies on, in one place.

Keras offers no public way to do these few things; each is wrapped here so that a Keras upgrade that renames
or changes one breaks a single function, and ``tests/test_keras_compat.py`` (one canary per attribute) fails
with a message that names it instead of a training run failing deep inside Keras.
"""

from __future__ import annotations

import inspect

# (owner, attribute, what bcs-tf uses it for): the canary test checks each exists with the expected shape
PRIVATE = (
    ("keras.Model", "_flatten_layers", "every layer of a nested model (sparse_layers, masks, inheritance)"),
    ("keras.optimizers.Optimizer", "_get_variable_index", "the slot index of a variable (sampler resets slots)"),
    ("keras.optimizers.Optimizer", "_trainable_variables", "the variables the slot lists are aligned with"),
    ("keras.Model", "_distribute_strategy", "the strategy a model was built under (multi-worker build)"),
    ("keras.Model", "_maybe_symbolic_build", "overridden by RobustTrainer for multi-worker builds"),
    ("keras.Model", "_symbolic_build", "building from one replica's local batch"),
    ("tf.lite.TFLiteConverter", "_experimental_disable_per_channel", "per-tensor int8 weight scales"),
)


def flatten_layers(model):
    """Every layer inside ``model``, nested models' layers included, in a stable order (not ``model`` itself)."""
    return list(model._flatten_layers(include_self=False))


def optimizer_variable_index(optimizer, variable):
    """Index of ``variable`` in the lists of slot variables of a built Keras 3 optimizer."""
    return optimizer._get_variable_index(variable)


def optimizer_trainable_variables(optimizer):
    """The variables a built Keras 3 optimizer's slot lists are aligned with."""
    return optimizer._trainable_variables


def distribute_strategy(model):
    """The ``tf.distribute`` strategy ``model`` was created under, or None."""
    return model._distribute_strategy


def symbolic_build(model, data_batch):
    """Build ``model``'s metrics and optimizer state from one batch, as ``fit`` does before its first step."""
    model._symbolic_build(data_batch=data_batch)


def symbolic_build_hook_parameters(model_class):
    """The parameter names of ``fit``'s build hook that RobustTrainer overrides (the canary checks them)."""
    return tuple(inspect.signature(model_class._maybe_symbolic_build).parameters)


def set_per_tensor_int8(converter, per_tensor):
    """Ask the LiteRT converter for one int8 scale per tensor instead of per output channel."""
    converter._experimental_disable_per_channel = bool(per_tensor)
