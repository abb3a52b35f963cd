"""``--strategy``: train on one device, on every local device (``MirroredStrategy``), or on several machines
(``MultiWorkerMirroredStrategy``, configured by ``TF_CONFIG``).

The trainer is distribution-aware (``bcs_tf.trainer``): each replica's loss is scaled so the summed gradients
are the global-batch mean, and the Langevin rewiring runs once per step in cross-replica context, so every
replica applies the same noise, deaths and re-activations and holds exactly the budget; BatchNorm is
synchronized across replicas (``bcs_tf.factory.batch_norm``). Across workers the rewiring is computed by every
worker from the same all-reduced θ and the same seed stream, so the workers agree without broadcasting.
"""

from __future__ import annotations

import json
import os

from bcs_tf.errors import ConfigError


def make_strategy(name):
    """The ``tf.distribute`` strategy ``name``: ``default`` (one device), ``mirrored`` (every GPU, else every
    logical CPU device) or ``multiworker`` (the cluster of ``TF_CONFIG``)."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multiworker":
        cluster_of_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices])


def cluster_of_tf_config():
    """``(workers, this worker's index)`` from ``TF_CONFIG``; a clear error when it is missing or malformed."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError("--strategy multiworker needs TF_CONFIG, e.g. '{\"cluster\": {\"worker\": [\"host1:2222\", "
                          "\"host2:2222\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}' (docs/design.md)")
    try:
        config = json.loads(raw)
        workers = list(config["cluster"]["worker"])
        index = int(config["task"]["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"TF_CONFIG is not a cluster with workers and a task index ({exc!r})") from None
    if not 0 <= index < len(workers):
        raise ConfigError(f"TF_CONFIG: task index {index} is not one of the {len(workers)} workers")
    return workers, index
