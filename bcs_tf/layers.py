"""Sparse Keras layers with the BCS reparametrisation ``w = γ · max(0, θ)``.

Every kernel entry k has a trainable θ_k and a fixed, non-trainable sign γ_k ∈ {−1, +1}. Entries with θ_k ≤ 0
are *dormant*: they contribute exactly zero and get zero gradient. The layers are ordinary Keras 3 layers
(serialisable, usable in functional models); the connectivity sampler reaches them only through the
:class:`SparseKernelMixin` protocol (``theta``, ``sign``, ``kernel``, ``kernel_size_total``).

Structured granularities keep that protocol with one θ per *group* of weights:

- blocks (``SparseDense(block_size=b)``, b consecutive inputs of one output: LiteRT's 1×b sparse
  FULLY_CONNECTED blocks): ``w_g = γ_g · max(0, θ_g) · v_g / ‖v_g‖`` with a trainable direction v. θ_g is
  the block's norm and the L1 prior on it a group lasso; at b = 1, v/‖v‖ = ±1 and this is BCS exactly;
- channels (:class:`ChannelGate` after a layer's normalisation): ``y_c = γ_c · max(0, θ_c) · x_c``, so a
  dormant channel is exactly zero after the following ReLU and the network compacts into a narrower one.
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from bcs_tf._keras_compat import flatten_layers
from bcs_tf.errors import ConfigError, check_fraction


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


def group_norms(v, block):
    """‖v_g‖ of every block ``g`` of ``v`` (blocks of shape ``block`` tiling ``v``), in the grid's shape."""
    split = []
    for size, b in zip(v.shape, block):
        split += [int(size) // b, b]
    squares = ops.sum(ops.square(ops.reshape(v, split)), axis=tuple(range(1, 2 * len(block), 2)))
    return ops.sqrt(squares)


def expand_blocks(g, block):
    """Repeat every entry of the grid ``g`` over its block: the inverse of the grid reduction."""
    for axis, b in enumerate(block):
        if b > 1:
            g = ops.repeat(g, b, axis=axis)
    return g


class SparseKernelMixin:
    """Shared θ/γ machinery of the sparse layers (the protocol the sampler relies on).

    ``block`` (None = one θ per weight) tiles the kernel into groups with one θ and γ each; the weights of a
    group then share their connection and keep their relative values in a trainable ``direction``.
    """

    block = None

    def _init_sparse_kernel(self, connectivity, seed):
        self.connectivity = check_fraction(connectivity)
        self.seed = seed

    def _add_sparse_kernel(self, shape, fan_in, block=None):
        rng = np.random.default_rng(self.seed)
        self.fan_in = fan_in
        if block is not None and all(b == 1 for b in block):
            block = None
        grid = shape
        if block is not None:
            if any(s % b for s, b in zip(shape, block)):
                raise ConfigError(f"layer {self.name}: kernel {shape} cannot be tiled into blocks {block}; "
                                  "choose a block size that divides its input size")
            grid = tuple(s // b for s, b in zip(shape, block))
            v0 = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
            self.direction = self.add_weight(name="direction", shape=shape,
                                             initializer=lambda shape, dtype=None: v0, trainable=True)
        self.block = block
        theta0 = self._draw_theta(grid, max(1, int(round(self.connectivity * int(np.prod(grid))))), rng)
        sign0 = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=grid)
        self.theta = self.add_weight(
            name="theta", shape=grid, initializer=lambda shape, dtype=None: theta0, trainable=True
        )
        self.sign = self.add_weight(
            name="sign", shape=grid, initializer=lambda shape, dtype=None: sign0, trainable=False
        )

    def _draw_theta(self, grid, n_active, rng):
        """θ with exactly ``n_active`` active entries: |He-normal| values, or for blocks the norms of their
        directions (so an active block starts as He-normal weights)."""
        if self.block is None:
            return sparse_theta_values(grid, n_active, self.fan_in, rng)
        norms = ops.convert_to_numpy(group_norms(self.direction, self.block)).ravel()
        theta = np.zeros(norms.size, np.float32)
        idx = rng.choice(norms.size, size=n_active, replace=False)
        theta[idx] = np.maximum(norms[idx], np.float32(1e-12))
        return theta.reshape(grid)

    _kernel_override = None

    @property
    def kernel(self):
        """The effective kernel γ·max(0, θ) (times the block directions); dormant entries are exactly zero."""
        if self._kernel_override is not None:
            return self._kernel_override
        return self.effective_kernel()

    def effective_kernel(self):
        """γ·max(0, θ), or per block γ_g·max(0, θ_g)·v_g/‖v_g‖, computed from the variables."""
        scale = self.sign * ops.relu(self.theta)
        if self.block is None:
            return scale
        scale = scale / ops.maximum(group_norms(self.direction, self.block), 1e-12)
        return expand_blocks(scale, self.block) * self.direction

    @property
    def kernel_size_total(self):
        """Number of prunable units (weights, blocks or channels) of this layer."""
        return int(np.prod(self.theta.shape))

    @property
    def group_size(self):
        """Weights per prunable unit."""
        return int(np.prod(self.block)) if self.block is not None else 1

    def active_count(self):
        """Number of active connections (θ > 0), as a Python int."""
        return int(np.count_nonzero(ops.convert_to_numpy(self.theta) > 0))

    def reset_connectivity(self, n_active, seed=None):
        """Re-draw θ with exactly ``n_active`` active entries (signs and directions are kept)."""
        rng = np.random.default_rng(self.seed if seed is None else seed)
        self.theta.assign(self._draw_theta(tuple(self.theta.shape), int(n_active), rng))

    def _sparse_config(self):
        return {"connectivity": self.connectivity, "seed": self.seed}


@keras.saving.register_keras_serializable(package="bcs_tf")
class SparseDense(SparseKernelMixin, keras.layers.Layer):
    """Fully connected layer whose kernel is γ·max(0, θ); the bias stays dense.

    Args:
        units: output dimension.
        use_bias: whether to add a (dense, unconstrained) bias.
        connectivity: initial fraction of active kernel entries (blocks), in (0, 1].
        seed: integer seed for θ and γ initialisation.
        block_size: connections are blocks of this many consecutive inputs of one output (1 = weights).
    """

    def __init__(self, units, use_bias=True, connectivity=1.0, seed=None, block_size=1, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(units, int) or units <= 0:
            raise ConfigError(f"`units` must be a positive int. Received: units={units!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"`block_size` must be a positive int. Received: block_size={block_size!r}")
        self.units = units
        self.use_bias = use_bias
        self.block_size = block_size
        self._init_sparse_kernel(connectivity, seed)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)

    def build(self, input_shape):
        in_dim = input_shape[-1]
        self._add_sparse_kernel((in_dim, self.units), fan_in=in_dim, block=(self.block_size, 1))
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros") if self.use_bias else None
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: in_dim})

    def call(self, inputs):
        y = ops.matmul(inputs, ops.cast(self.kernel, inputs.dtype))  # bf16/fp16 compute under mixed precision
        return y + self.bias if self.bias is not None else y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "use_bias": self.use_bias, "block_size": self.block_size,
                **self._sparse_config()}


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


@keras.saving.register_keras_serializable(package="bcs_tf")
class ChannelGate(SparseKernelMixin, keras.layers.Layer):
    """Channel-granular connectivity: ``y[..., c] = γ_c · max(0, θ_c) · x[..., c]``.

    Placed after a layer's normalisation (before its ReLU), so a dormant channel (θ_c ≤ 0) is exactly zero
    downstream: the layer's output channel c and the next layer's input c can be cut out (export compacts the
    network). Active channels start at θ_c = 1 (the identity) and γ_c = +1; re-activated ones at 1e-12.

    Args:
        connectivity: initial fraction of active channels, in (0, 1].
        seed: integer seed of the initial choice of channels.
    """

    def __init__(self, connectivity=1.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self._init_sparse_kernel(connectivity, seed)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.fan_in = 1
        theta0 = self._draw_theta((channels,), max(1, int(round(self.connectivity * channels))),
                                  np.random.default_rng(self.seed))
        self.theta = self.add_weight(name="theta", shape=(channels,),
                                     initializer=lambda shape, dtype=None: theta0, trainable=True)
        self.sign = self.add_weight(name="sign", shape=(channels,), initializer="ones", trainable=False)

    def _draw_theta(self, grid, n_active, rng):
        theta = np.zeros(grid, np.float32)
        theta[rng.choice(grid[0], size=n_active, replace=False)] = 1.0
        return theta

    def call(self, inputs):
        return inputs * ops.cast(self.kernel, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), **self._sparse_config()}


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
        layer._kernel_override = tf.stop_gradient(layer.effective_kernel())
    try:
        yield
    finally:
        for layer in layers:
            layer._kernel_override = None


def sparse_layers(model):
    """All sparse layers of ``model`` (nested models included), in a stable order."""
    return [layer for layer in flatten_layers(model) if isinstance(layer, SparseKernelMixin)]
