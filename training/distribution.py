"""``--strategy``: train on one device, or on every local device with ``tf.distribute.MirroredStrategy``.

The trainer is distribution-aware (``bcs_tf.trainer``): each replica's loss is scaled so the summed gradients
are the global-batch mean, and the Langevin rewiring runs once per step in cross-replica context, so every
replica applies the same noise, deaths and re-activations and holds exactly the budget; BatchNorm is
synchronized across replicas (``bcs_tf.factory.batch_norm``). Several machines (``MultiWorkerMirroredStrategy``)
are not offered: Keras 3.15's ``fit`` fails under it before and after the first step (docs/design.md).
"""

from __future__ import annotations


def make_strategy(name):
    """The ``tf.distribute`` strategy ``name``: ``default`` (one device) or ``mirrored`` (every GPU, else every
    logical CPU device)."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices])
