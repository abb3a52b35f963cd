"""Model registry: builds a named architecture as its sparse (BCS / random) or dense variant.

For sparse variants every conv and dense kernel is a sparse layer inside one budget; the initial per-layer
counts follow the architecture's profile (the BCS authors' initial per-layer densities, docs/design.md), scaled
so that they sum to the budget exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import typing

import keras

import bcs_tf.architectures as arch
from bcs_tf.connectivity import configure_connectivity
from bcs_tf.errors import ConfigError, check_fraction
from bcs_tf.factory import LayerFactory
from bcs_tf.layers import sparse_layers

METHODS = ("bcs", "random", "dense")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """An architecture, its natural input shape and its initial-connectivity profile."""

    builder: typing.Callable
    input_shape: tuple
    profile: typing.Callable  # c -> {tag: initial fraction}
    family: str  # models of one family differ only in width (inverse weights inheritance maps between them)
    width: int = 1
    chain: bool = True  # no residual additions: channel granularity can cut channels out of every layer


def _small_cnn(width):
    return ModelSpec(functools.partial(arch.small_cnn, width=width), (28, 28, 1), arch.authors_profile(0.2),
                     "small_cnn", width)


def _wrn(width):
    return ModelSpec(functools.partial(arch.wide_resnet, depth=28, width=width), (32, 32, 3),
                     arch.authors_profile(0.1), "wrn28", width, chain=False)


MODELS = {
    "small_cnn": _small_cnn(1),
    "small_cnn_x2": _small_cnn(2),
    "small_cnn_x4": _small_cnn(4),
    "vgg16": ModelSpec(arch.vgg16, (32, 32, 3), arch.authors_profile(0.2), "vgg16"),
    "resnet18": ModelSpec(arch.resnet18, (32, 32, 3), arch.authors_profile(0.2), "resnet18", chain=False),
    "mobilenet": ModelSpec(arch.mobilenet, (28, 28, 1), arch.authors_profile(0.2), "mobilenet"),
    "wrn28_2": _wrn(2),
    "wrn28_4": _wrn(4),
    "wrn28_10": _wrn(10),
}


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


@contextlib.contextmanager
def precision_policy(precision):
    """Keras dtype policy ``precision`` for the layers built inside the block, then the previous one again.

    ``mixed_bfloat16`` computes in bfloat16 with float32 variables (θ, γ, BatchNorm statistics), which
    oneDNN runs on the AMX/AVX-512-BF16 units of recent x86 CPUs: WRN-28-2 steps about twice as fast
    here (bench/step_time.py --precision). No loss scaling is needed: bfloat16 has float32's range.
    ``mixed_float16`` (GPUs' tensor cores) needs it: the trainer is then given a ``LossScaleOptimizer``.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}. Received: {precision!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_model(name="small_cnn", method="bcs", connectivity=0.01, budget="global", seed=0,
                input_shape=None, num_classes=10, precision="float32", granularity="weight", block_size=4, width=1):
    """Build model ``name`` for ``method``; returns ``(model, allocation)`` (allocation is None when dense).

    ``method="dense"`` or ``connectivity=1`` gives standard Keras layers; otherwise every conv and dense
    kernel is a sparse layer and the exact budget is set (see :func:`bcs_tf.connectivity.allocate_budget`),
    counted in ``granularity`` units (weights, ``block_size`` blocks of dense layers, or channels; see
    :class:`~bcs_tf.factory.LayerFactory`). ``precision`` is the compute dtype policy (see
    :func:`precision_policy`); the model outputs float32 logits. ``width`` (small_cnn only) scales every
    layer's channels, e.g. 0.25 for a narrow dense network.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model; choose one of {sorted(MODELS)}. Received: model={name!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown method; choose one of {METHODS}. Received: method={method!r}")
    check_fraction(connectivity)
    spec = MODELS[name]
    if width != 1:
        if name != "small_cnn" or not width > 0:
            raise ConfigError(f"width scales small_cnn's channels (> 0). Received: model={name!r}, width={width!r}")
        spec = _small_cnn(float(width))
    input_shape = tuple(input_shape or spec.input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ConfigError(f"input shape must be (height, width, channels). Received: input_shape={input_shape}")
    sparse = method != "dense" and connectivity < 1.0
    if sparse and granularity == "channel" and not spec.chain:
        raise ConfigError(f"channel granularity needs a network without residual additions (one of "
                          f"{sorted(n for n, m in MODELS.items() if m.chain)}). Received: model={name!r}")
    keras.utils.set_random_seed(seed)
    factory = LayerFactory(sparse, connectivity, seed, granularity=granularity, block_size=block_size)
    try:
        with precision_policy(precision):
            model = spec.builder(factory, input_shape=input_shape, num_classes=num_classes)
    except ValueError as exc:  # e.g. an input too small for the network's pooling
        raise ConfigError(f"model {name} cannot take inputs of shape {input_shape}: {exc}") from None
    if not sparse:
        return model, None
    fractions = spec.profile(connectivity)
    profile = [fractions[factory.tags[layer.name]] for layer in sparse_layers(model)]
    allocation = configure_connectivity(model, connectivity, budget, profile, seed=seed)
    return model, allocation
