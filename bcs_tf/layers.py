"""Sparse Keras layers with the BCS reparametrisation ``w = γ · max(0, θ)``.

Every kernel entry k has a trainable θ_k and a fixed, non-trainable sign γ_k ∈ {−1, +1}. Entries with θ_k ≤ 0
are *dormant*: they contribute exactly zero and get zero gradient. The layers are ordinary Keras 3 layers
(serialisable, usable in functional models); the connectivity sampler reaches them only through the
:class:`SparseKernelMixin` protocol (``theta``, ``sign``, ``kernel``, ``kernel_size_total``).
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from bcs_tf.errors import ConfigError


def _check_connectivity(value, name="connectivity"):
    if not (isinstance(value, (int, float)) and 0.0 < float(value) <= 1.0):
        raise ConfigError(f"`{name}` must be in (0, 1]. Received: {name}={value!r}")
    return float(value)


def sparse_theta_values(shape, n_active, fan_in, rng):
    """θ values for a kernel of ``shape`` with exactly ``n_active`` active entries.

    Active entries get |He-normal| magnitudes (std sqrt(2 / fan_in)); all other entries are exactly 0,
    as in the authors' initialisation.
    """
    size = int(np.prod(shape))
    if not 0 <= n_active <= size:
        raise ConfigError(f"active count must be in [0, {size}]. Received: n_active={n_active}")
    theta = np.zeros(size, dtype=np.float32)
    idx = rng.choice(size, size=n_active, replace=False)
    theta[idx] = np.abs(rng.normal(0.0, math.sqrt(2.0 / fan_in), size=n_active)).astype(np.float32)
    # |N(0, s)| can be exactly 0 in float32 only with vanishing probability; guard the count anyway.
    theta[idx] = np.maximum(theta[idx], np.float32(1e-12))
    return theta.reshape(shape)


class SparseKernelMixin:
    """Shared θ/γ machinery of the sparse layers (the protocol the sampler relies on)."""

    def _init_sparse_kernel(self, connectivity, seed):
        self.connectivity = _check_connectivity(connectivity)
        self.seed = seed

    def _add_sparse_kernel(self, shape, fan_in):
        rng = np.random.default_rng(self.seed)
        n_active = max(1, int(round(self.connectivity * int(np.prod(shape)))))
        theta0 = sparse_theta_values(shape, n_active, fan_in, rng)
        sign0 = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=shape)
        self.theta = self.add_weight(
            name="theta", shape=shape, initializer=lambda shape, dtype=None: theta0, trainable=True
        )
        self.sign = self.add_weight(
            name="sign", shape=shape, initializer=lambda shape, dtype=None: sign0, trainable=False
        )
        self.fan_in = fan_in

    _kernel_override = None

    @property
    def kernel(self):
        """The effective kernel γ·max(0, θ); dormant entries are exactly zero."""
        if self._kernel_override is not None:
            return self._kernel_override
        return self.sign * ops.relu(self.theta)

    @property
    def kernel_size_total(self):
        """Number of prunable kernel entries of this layer."""
        return int(np.prod(self.theta.shape))

    def active_count(self):
        """Number of active connections (θ > 0), as a Python int."""
        return int(np.count_nonzero(ops.convert_to_numpy(self.theta) > 0))

    def reset_connectivity(self, n_active, seed=None):
        """Re-draw θ with exactly ``n_active`` active entries (signs are kept)."""
        rng = np.random.default_rng(self.seed if seed is None else seed)
        self.theta.assign(sparse_theta_values(tuple(self.theta.shape), int(n_active), self.fan_in, rng))

    def _sparse_config(self):
        return {"connectivity": self.connectivity, "seed": self.seed}


@keras.saving.register_keras_serializable(package="bcs_tf")
class SparseDense(SparseKernelMixin, keras.layers.Layer):
    """Fully connected layer whose kernel is γ·max(0, θ); the bias stays dense.

    Args:
        units: output dimension.
        use_bias: whether to add a (dense, unconstrained) bias.
        connectivity: initial fraction of active kernel entries, in (0, 1].
        seed: integer seed for θ and γ initialisation.
    """

    def __init__(self, units, use_bias=True, connectivity=1.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(units, int) or units <= 0:
            raise ConfigError(f"`units` must be a positive int. Received: units={units!r}")
        self.units = units
        self.use_bias = use_bias
        self._init_sparse_kernel(connectivity, seed)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)

    def build(self, input_shape):
        in_dim = input_shape[-1]
        self._add_sparse_kernel((in_dim, self.units), fan_in=in_dim)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros") if self.use_bias else None
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: in_dim})

    def call(self, inputs):
        y = ops.matmul(inputs, ops.cast(self.kernel, inputs.dtype))  # bf16/fp16 compute under mixed precision
        return y + self.bias if self.bias is not None else y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "use_bias": self.use_bias, **self._sparse_config()}


@keras.saving.register_keras_serializable(package="bcs_tf")
class SparseConv2D(SparseKernelMixin, keras.layers.Layer):
    """2-D convolution (channels last) whose kernel is γ·max(0, θ).

    Args:
        filters: number of output channels.
        kernel_size: int or pair.
        strides: int or pair.
        padding: ``"same"`` or ``"valid"``.
        use_bias: whether to add a dense bias (off by default: the models follow convs with BatchNorm).
        connectivity: initial fraction of active kernel entries, in (0, 1].
        seed: integer seed for θ and γ initialisation.
    """

    def __init__(self, filters, kernel_size, strides=1, padding="same", use_bias=False, connectivity=1.0,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(filters, int) or filters <= 0:
            raise ConfigError(f"`filters` must be a positive int. Received: filters={filters!r}")
        if padding not in ("same", "valid"):
            raise ConfigError(f"`padding` must be 'same' or 'valid'. Received: padding={padding!r}")
        self.filters = filters
        self.kernel_size = _pair(kernel_size)
        self.strides = _pair(strides)
        self.padding = padding
        self.use_bias = use_bias
        self._init_sparse_kernel(connectivity, seed)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        c_in = input_shape[-1]
        shape = self.kernel_size + (c_in, self.filters)
        self._add_sparse_kernel(shape, fan_in=self.kernel_size[0] * self.kernel_size[1] * c_in)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros") if self.use_bias else None
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: c_in})

    def call(self, inputs):
        y = ops.conv(inputs, ops.cast(self.kernel, inputs.dtype), strides=self.strides, padding=self.padding)
        return y + self.bias if self.bias is not None else y

    def compute_output_shape(self, input_shape):
        return keras.layers.Conv2D(self.filters, self.kernel_size, self.strides, self.padding).compute_output_shape(
            input_shape
        )

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "use_bias": self.use_bias,
            **self._sparse_config(),
        }


def _pair(value):
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"expected an int or a pair of positive ints. Received: {value!r}")
    return value


@contextlib.contextmanager
def frozen_kernels(model):
    """Compute every sparse layer's effective kernel once and reuse it inside the block.

    For code that needs no gradient with respect to θ, such as the attack inside a training step: its
    10–100 forward/backward passes then read one precomputed tensor per layer instead of re-deriving
    γ·max(0, θ) on every pass (the dense-equivalent cost of the sparse layers).
    """
    layers = sparse_layers(model)
    for layer in layers:
        layer._kernel_override = tf.stop_gradient(layer.sign * ops.relu(layer.theta))
    try:
        yield
    finally:
        for layer in layers:
            layer._kernel_override = None


def sparse_layers(model):
    """All sparse layers of ``model`` (nested models included), in a stable order."""
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, SparseKernelMixin)]
