"""Network definitions written once against a :class:`~bcs_tf.factory.LayerFactory`.

Each architecture comes with the authors' initial connectivity profile: a map from profile tag to the
initial fraction of active entries at target connectivity c (scaled to the exact global budget later).
"""

from __future__ import annotations

import keras

from bcs_tf.factory import batch_norm, bn_relu, conv_bn_relu, gated_bn_relu


def small_cnn(f, input_shape=(28, 28, 1), num_classes=10, width=1):
    """Three conv-BN-ReLU blocks (16w, 32w/2, 64w/2 channels) and a 128w-unit dense head (≈426k kernel entries
    at width w = 1; a fractional w keeps max(1, round(n·w)) of each layer's n channels).

    Sized for CPU adversarial training of 28×28 images (see bench/step_time.py for its step time); wider
    variants are the large networks of inverse weights inheritance, narrower ones the dense baselines that fit
    a microcontroller's flash (bench/micro.py).
    """
    def channels(n):
        return n * width if isinstance(width, int) else max(1, round(n * width))

    inputs = keras.Input(input_shape, name="image")
    x = conv_bn_relu(f, inputs, channels(16), 1, "block1", tag="first")
    x = conv_bn_relu(f, x, channels(32), 2, "block2", tag="second")
    x = conv_bn_relu(f, x, channels(64), 2, "block3")
    x = keras.layers.Flatten(name="flatten")(x)
    x = gated_bn_relu(f, f.dense(channels(128), name="fc1")(x), "fc1")
    outputs = f.dense(num_classes, name="logits", tag="output")(x)
    name = "small_cnn" if width == 1 else f"small_cnn_x{width}" if isinstance(width, int) else f"small_cnn_w{width:g}"
    return keras.Model(inputs, outputs, name=name)


def vgg16(f, input_shape=(32, 32, 3), num_classes=10):
    """VGG-16 as the authors use it: 13 conv-BN-ReLU (4 max-pools) and dense 2048→256→256→classes."""
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    inputs = keras.Input(input_shape, name="image")
    x, conv_id = inputs, 0
    for item in plan:
        if item == "M":
            x = keras.layers.MaxPooling2D(2, name=f"pool{conv_id}")(x)
            continue
        conv_id += 1
        tag = "first" if conv_id <= 2 else "second" if conv_id <= 4 else "middle"
        x = conv_bn_relu(f, x, item, 1, f"conv{conv_id}", tag=tag)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.ReLU(name="fc1_relu")(f.gate(f.dense(256, name="fc1")(x), "fc1"))
    x = keras.layers.ReLU(name="fc2_relu")(f.gate(f.dense(256, name="fc2")(x), "fc2"))
    outputs = f.dense(num_classes, name="logits", tag="output")(x)
    return keras.Model(inputs, outputs, name="vgg16")


def _basic_block(f, x, filters, strides, name, tag):
    """Post-activation ResNet basic block with a 1×1 projection shortcut when the shape changes."""
    shortcut = x
    y = conv_bn_relu(f, x, filters, strides, f"{name}_a", tag=tag)
    y = f.conv(filters, 3, name=f"{name}_b_conv", tag=tag)(y)
    y = batch_norm(f"{name}_b_bn")(y)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = f.conv(filters, 1, strides=strides, name=f"{name}_short_conv", tag=tag)(x)
        shortcut = batch_norm(f"{name}_short_bn")(shortcut)
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([y, shortcut]))


def resnet18(f, input_shape=(32, 32, 3), num_classes=10):
    """CIFAR ResNet-18: 3×3 stem, four stages of two basic blocks (64, 128, 256, 512), global pool, dense."""
    inputs = keras.Input(input_shape, name="image")
    x = conv_bn_relu(f, inputs, 64, 1, "stem", tag="first")
    for stage, filters in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            strides = 2 if stage > 1 and block == 0 else 1
            x = _basic_block(f, x, filters, strides, f"s{stage}b{block}", tag="second" if stage == 1 else "middle")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = f.dense(num_classes, name="logits", tag="output")(x)
    return keras.Model(inputs, outputs, name="resnet18")


def _wide_block(f, x, filters, strides, name, tag):
    """Pre-activation wide-ResNet block (BN-ReLU-conv ×2), 1×1 shortcut from the activated input."""
    equal = x.shape[-1] == filters and strides == 1
    act = bn_relu(x, f"{name}_pre")
    y = f.conv(filters, 3, strides=strides, name=f"{name}_a_conv", tag=tag)(act)
    y = f.conv(filters, 3, name=f"{name}_b_conv", tag=tag)(bn_relu(y, f"{name}_mid"))
    shortcut = x if equal else f.conv(filters, 1, strides=strides, name=f"{name}_short_conv", tag=tag,
                                      padding="valid")(act)
    return keras.layers.Add(name=f"{name}_add")([y, shortcut])


def wide_resnet(f, depth=28, width=10, input_shape=(32, 32, 3), num_classes=10):
    """WRN-depth-width (Zagoruyko & Komodakis), the authors' variant: three groups of (depth−4)/6 blocks."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4. Received: depth={depth}")
    n = (depth - 4) // 6
    inputs = keras.Input(input_shape, name="image")
    x = f.conv(16, 3, name="stem_conv", tag="first")(inputs)
    for group, filters in enumerate((16 * width, 32 * width, 64 * width), start=1):
        for block in range(n):
            strides = 2 if group > 1 and block == 0 else 1
            x = _wide_block(f, x, filters, strides, f"g{group}b{block}", tag="second" if group == 1 else "middle")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(bn_relu(x, "final"))
    outputs = f.dense(num_classes, name="logits", tag="output")(x)
    return keras.Model(inputs, outputs, name=f"wrn{depth}_{width}")


def mobilenet(f, input_shape=(28, 28, 1), num_classes=10, width=1):
    """MobileNet-v1 style for small images: a 3×3 stride-2 stem, five depthwise-3×3 + pointwise-1×1 blocks
    (32w…128w channels, two more stride-2 steps), global average pooling and a dense head.

    Built to XNNPACK's sparse-inference rules (its README in TensorFlow): the stem sees 3 channels (a grey
    image is repeated), stride-2 layers pad explicitly by 1 on each side (TensorFlow's SAME pads 0/1 there),
    1×1 convolutions have no padding and the network ends in a spatial mean; its 1×1 kernels trained sparse
    then run on XNNPACK's sparse kernels after export. The depthwise kernels (9 weights per channel) stay
    dense. At channel granularity a layer's channels are gated after the depthwise convolution that follows
    it (that depthwise layer's BatchNorm would turn a zero channel into a constant).
    """
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    if input_shape[-1] == 1:
        x = keras.layers.Concatenate(name="grey_to_rgb")([x, x, x])
    x = keras.layers.ZeroPadding2D(1, name="stem_pad")(x)
    x = bn_relu(f.conv(16 * width, 3, strides=2, name="stem_conv", tag="first", padding="valid")(x), "stem")
    tag, blocks = "first", ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))
    for i, (filters, strides) in enumerate(blocks, start=1):
        if strides == 2:
            x = keras.layers.ZeroPadding2D(1, name=f"dw{i}_pad")(x)
        x = keras.layers.DepthwiseConv2D(3, strides=strides, padding="same" if strides == 1 else "valid",
                                         use_bias=False, name=f"dw{i}_conv")(x)
        x = gated_bn_relu(f, x, f"dw{i}", tag)  # gates the channels of the layer before it
        tag = "second" if i == 1 else "middle"
        x = f.conv(filters * width, 1, name=f"pw{i}_conv", tag=tag, padding="valid")(x)
        x = gated_bn_relu(f, x, f"pw{i}", tag) if i == len(blocks) else bn_relu(x, f"pw{i}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = f.dense(num_classes, name="logits", tag="output")(x)
    return keras.Model(inputs, outputs, name="mobilenet" if width == 1 else f"mobilenet_x{width}")


def authors_profile(second):
    """Initial fractions: first layer(s) 0.6, ``second`` for the early stage, 0.5c in the middle, output 0.6."""
    return lambda c: {"first": 0.6, "second": second, "middle": 0.5 * c, "output": 0.6}
