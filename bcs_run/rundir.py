"""The run directory: the one owner of every file name in it, written atomically, finished by a marker.

``training.run`` writes ``config.json`` first, checkpoints while it trains, then ``model.keras`` and
``metrics.json`` and, last of all (after its reports), the completion marker ``COMPLETE``: a directory is a
finished run when the marker is there, whatever else a killed process left behind. Runs made before the marker
existed count as finished when their ``metrics.json`` is readable and ``model.keras`` is there.
"""

from __future__ import annotations

import json
import os
import pathlib


def atomic_write(path, data):
    """Write ``data`` (str or bytes) to ``path`` so that a reader, or a crash, never sees a partial file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # named after the file it was for (a full disk says which write failed)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


class RunDir:
    """Paths of one run directory (``training.run --out``, or a results directory's collected copy)."""

    CONFIG, METRICS, MODEL, ARCHIVE = "config.json", "metrics.json", "model.keras", "network.npz"
    BEST, CHECKPOINT, LOGS, PHASES, SNAPSHOTS = "best.weights.h5", "checkpoint", "logs", "phases", "snapshots"
    REPORT, FIGURES, COMPLETE = "report.md", "figures", "COMPLETE"
    # what training.run writes: --overwrite removes exactly these and leaves anything else the user put there
    OWN = (MODEL, METRICS, CONFIG, BEST, CHECKPOINT, LOGS, PHASES, SNAPSHOTS, REPORT, FIGURES, COMPLETE)

    def __init__(self, path):
        self.path = pathlib.Path(path)

    config = property(lambda self: self.path / self.CONFIG)
    metrics = property(lambda self: self.path / self.METRICS)
    model = property(lambda self: self.path / self.MODEL)
    archive = property(lambda self: self.path / self.ARCHIVE)
    checkpoint = property(lambda self: self.path / self.CHECKPOINT)
    phases = property(lambda self: self.path / self.PHASES)

    def snapshot(self, epoch):
        """The network's weights kept after ``epoch`` (0 = before training), for lottery rewinding."""
        return self.path / self.SNAPSHOTS / f"epoch_{epoch}.weights.h5"

    def report(self, name="eval"):
        """The parsed ``NAME.json`` of ``training.evaluate --name NAME``, or None when missing or unreadable."""
        return self.read_json(f"{name}.json")

    def network(self):
        """The file holding the finished network: ``model.keras``, else the archive, else None."""
        for path in (self.model, self.archive):
            if path.is_file():
                return path
        return None

    def read_json(self, name):
        """The parsed JSON file ``name`` (e.g. RunDir.METRICS), or None when it is missing or unreadable."""
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def write_json(self, name, data):
        """Write ``data`` as ``name`` atomically."""
        atomic_write(self.path / name, json.dumps(data, indent=1))

    def mark_complete(self):
        """Write the completion marker: the last thing a finished run writes."""
        atomic_write(self.path / self.COMPLETE, "finished\n")

    def is_complete(self):
        """Whether the run finished: its marker, or for a run made before markers existed (its metrics.json
        does not announce one) a readable metrics.json beside model.keras."""
        if (self.path / self.COMPLETE).is_file():
            return True
        metrics = self.read_json(self.METRICS)
        return self.model.is_file() and metrics is not None and not metrics.get("completion_marker")
