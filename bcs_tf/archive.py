"""A trained network as one small, lossless file (``network.npz``), so that any reported number can be attacked
again on another machine without retraining.

The file holds the Keras architecture (``model.to_json()``), a JSON ``meta`` dict (the run's config) and every
variable of ``model.weights`` in order. Sparse layers' θ and γ are stored only at their active entries (θ > 0):
a flat index, θ and the sign (int8); every other variable is stored whole. Loading sets dormant θ to 0 and their
γ to +1; both enter the network only through γ·max(0, θ) = 0, so the loaded network computes exactly what the
saved one did (same kernels, same BatchNorm, same logits). What is not kept is what only training would read
again: the negative values of dormant θ and the optimizer state (a run's ``checkpoint/`` keeps those).
A 99%-sparse small_cnn takes ≈ 33 KB instead of the 1.8 MB of its ``model.keras``. In a channel-granular
network, the weights of dormant channels (the producing kernel's outputs, their BatchNorm entries, the next
layer's inputs) are stored as zeros for the same reason: the gate's 0 means nothing reads them, and zeros
compress to nothing, so the file is about the size of the compacted network's.
"""

from __future__ import annotations

import io
import json
import pathlib
import zipfile

import keras
import numpy as np

from bcs_tf.checkpoint import replace_atomically
from bcs_tf.compact import dormant_channels_blanked, has_channel_gates
from bcs_tf.errors import CheckpointError, ConfigError
from bcs_tf.layers import sparse_layers

FORMAT = 1


def _sparse_roles(model):
    """``{id(variable): (role, θ variable, position of θ in model.weights)}`` for every sparse layer's θ and γ."""
    position = {id(v): i for i, v in enumerate(model.weights)}
    roles = {}
    for layer in sparse_layers(model):
        roles[id(layer.theta)] = ("theta", layer.theta, position[id(layer.theta)])
        roles[id(layer.sign)] = ("sign", layer.theta, position[id(layer.theta)])
    return roles


def save_archive(model, path, meta=None):
    """Write ``model`` (and the JSON-serialisable ``meta``) to ``path`` atomically; returns its size in bytes."""
    path = pathlib.Path(path)
    roles = _sparse_roles(model)
    blanked = {}
    if has_channel_gates(model):
        try:
            blanked = dormant_channels_blanked(model)
        except ConfigError:  # a network that cannot be compacted is stored whole
            pass
    arrays = {"format": np.array(FORMAT), "architecture": np.frombuffer(model.to_json().encode(), np.uint8),
              "meta": np.frombuffer(json.dumps(meta or {}).encode(), np.uint8),
              "paths": np.frombuffer(json.dumps([v.path for v in model.weights]).encode(), np.uint8)}
    for i, variable in enumerate(model.weights):
        value = blanked[id(variable)] if id(variable) in blanked else keras.ops.convert_to_numpy(variable)
        role, theta, j = roles.get(id(variable), (None, None, None))
        if role is None:
            arrays[f"v{i}"] = value
            continue
        active = np.flatnonzero(keras.ops.convert_to_numpy(theta).ravel() > 0).astype(np.uint32)
        if role == "theta":
            arrays[f"v{j}.index"], arrays[f"v{j}.theta"] = active, value.ravel()[active]
        else:
            arrays[f"v{j}.sign"] = np.where(value.ravel()[active] < 0, -1, 1).astype(np.int8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return path.stat().st_size


def _open(path):
    """``np.load`` of an archive, refusing a file that is not a zip first (numpy would otherwise try it as a pickle
    and say so, which names the wrong problem)."""
    if path.is_file() and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a bcs-tf network archive: not an .npz (zip) file; it may be truncated "
                              "or overwritten")
    return np.load(path)


def read_meta(path):
    """The ``meta`` dict of an archive without rebuilding its network; CheckpointError when it is not one."""
    path = pathlib.Path(path)
    try:
        with _open(path) as z:
            if int(z["format"]) != FORMAT:
                raise CheckpointError(f"{path} is not a bcs-tf network archive of format {FORMAT}")
            return json.loads(bytes(z["meta"]).decode())
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"cannot read the network archive {path}: {exc}") from None


def load_archive(path):
    """``(meta, model)`` of an archive written by :func:`save_archive`; CheckpointError when it is not one."""
    path = pathlib.Path(path)
    try:
        with _open(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"cannot read the network archive {path}: {exc}") from None
    if int(arrays.get("format", -1)) != FORMAT:
        raise CheckpointError(f"{path} is not a bcs-tf network archive of format {FORMAT}")
    try:
        model = keras.models.model_from_json(bytes(arrays["architecture"]).decode())
        paths = json.loads(bytes(arrays["paths"]).decode())
        meta = json.loads(bytes(arrays["meta"]).decode())
    except Exception as exc:  # Keras raises many kinds for an architecture it cannot rebuild
        raise CheckpointError(f"cannot rebuild the network in {path}: {type(exc).__name__}: {str(exc)[:200]}") \
            from None
    if [v.path for v in model.weights] != paths:
        raise CheckpointError(f"{path}: the rebuilt network's variables differ from the archived ones")
    roles = _sparse_roles(model)
    for i, variable in enumerate(model.weights):
        role, _, j = roles.get(id(variable), (None, None, None))
        if role is None:
            variable.assign(arrays[f"v{i}"])
            continue
        full = np.full(int(np.prod(variable.shape)), 0.0 if role == "theta" else 1.0, np.float32)
        full[arrays[f"v{j}.index"]] = arrays[f"v{j}.{role}"]
        variable.assign(full.reshape(tuple(variable.shape)))
    return meta, model
