"""The one small interface every training method implements, and what methods share.

A method turns a run's config into the network the final phase trains (:class:`Start`): BCS, random and
dense build it from scratch; Fixed, HYDRA and lottery tickets prune a finished dense run; IWI grows a finished
small sparse run. Methods with earlier phases (HYDRA's scores, the rounds of iterative pruning) train them
through :meth:`Context.phase`, each resumable in ``OUT/phases/NAME``. ``check_source`` runs before anything is
written, so a wrong ``--from`` leaves no trace.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import typing

from bcs_tf.archive import read_meta
from bcs_tf.errors import CheckpointError, ConfigError
from bcs_tf.models import build_model
from bcs_run.config import RunConfig, load_finished_run
from bcs_run.rundir import RunDir
from training.fitting import fit_phase


@dataclasses.dataclass
class Start:
    """The network of the final training phase and how it trains."""

    net: typing.Any
    allocation: typing.Any  # bcs_tf.connectivity.Allocation, or None for dense networks
    kind: str  # the layers it is built from: "bcs" (rewiring), "random" (static mask) or "dense"
    lr: float
    info: dict = dataclasses.field(default_factory=dict)  # written to metrics.json["method"]

    @property
    def rewire(self):
        """Whether the sampler rewires (BCS) or keeps the mask fixed."""
        return self.kind == "bcs"


@dataclasses.dataclass
class Context:
    """What a method may use: the config, the data, the run directory and the checked ``--from`` run."""

    cfg: RunConfig
    data: typing.Any
    out: pathlib.Path
    source_cfg: typing.Optional[RunConfig] = None
    verbose: int = 1

    def build(self, kind, connectivity=None, precision=None, seed=None):
        """``(net, allocation)`` of this run's model built from ``kind`` layers (see :func:`build_model`)."""
        cfg = self.cfg
        return build_model(cfg.model, kind, cfg.connectivity if connectivity is None else connectivity,
                           cfg.effective_budget, cfg.seed if seed is None else seed, self.data.input_shape,
                           self.data.num_classes, precision=precision or cfg.precision,
                           granularity=cfg.granularity, block_size=cfg.block_size, width=cfg.width)

    def source_model(self):
        """The ``--from`` run's selected network."""
        return load_finished_run(self.cfg.from_run)[1]

    def trainer(self, net, allocation=None, rewire=False):
        """A :class:`RobustTrainer` of ``net`` with this run's objective, attack and sampler settings."""
        return self.cfg.make_trainer(net, allocation, rewire)

    def phase(self, name, trainer, epochs, lr=None):
        """Train an earlier phase ``name`` (last-epoch weights kept; resumes from its own checkpoint)."""
        print(f"phase {name}: {epochs} epoch(s)")
        return fit_phase(trainer, self.cfg, self.data, self.out / "phases" / name, epochs, lr=lr,
                         verbose=self.verbose, select_best=False, max_steps=self.cfg.max_steps)


class Method:
    """Base class: a method from scratch needs no ``--from`` run."""

    name = ""

    def check_source(self, cfg, input_shape):
        """Check ``cfg.from_run`` (reading files only); returns its RunConfig or None. Raises on a wrong one."""
        return None

    def start(self, ctx):
        """The :class:`Start` of the final phase (may train earlier phases through ``ctx.phase``)."""
        raise NotImplementedError


def read_source(cfg, input_shape):
    """The RunConfig of ``--from`` after checking that it is a finished run on the same data: a run directory, or
    a results directory's archived run (``network.npz`` with its ``metrics.json``)."""
    src = pathlib.Path(cfg.from_run)
    if not src.is_dir():
        raise CheckpointError(f"--from: {src} is not a directory")
    if src.resolve() == pathlib.Path(cfg.out).resolve():
        raise ConfigError(f"--from: {src} is this run's own --out")
    run = RunDir(src)
    archived = not run.model.is_file() and run.archive.is_file() and run.metrics.is_file()
    if not (archived or (run.model.is_file() and run.is_complete())):
        raise CheckpointError(f"--from: {src} is not a finished run (no model.keras, metrics.json or completion "
                              "marker) nor an archived one (network.npz and metrics.json)")
    try:
        config = read_meta(run.archive)["config"] if archived else json.loads(run.config.read_text())
        source = RunConfig.from_dict(config)
        metrics = json.loads(run.metrics.read_text())
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"--from: cannot read the run in {src}: {exc}") from None
    if source.dataset != cfg.dataset:
        raise ConfigError(f"--from: {src} was trained on {source.dataset}, this run uses {cfg.dataset}")
    shape = metrics.get("input_shape")
    if shape is not None and tuple(shape) != tuple(input_shape):
        raise ConfigError(f"--from: {src} takes inputs of shape {tuple(shape)}, this run's data "
                          f"{tuple(input_shape)}")
    return source


def read_dense_source(cfg, input_shape):
    """:func:`read_source` for methods that prune a dense network of the same model."""
    source = read_source(cfg, input_shape)
    if (source.model, source.width) != (cfg.model, cfg.width):
        raise ConfigError(f"--from: {cfg.from_run} is a {source.model} of width {source.width:g}, this run a "
                          f"{cfg.model} of width {cfg.width:g}")
    if source.sparse:
        raise ConfigError(f"--from: {cfg.from_run} is a sparse run (method {source.method}, connectivity "
                          f"{source.connectivity}); --method {cfg.method} prunes a dense one")
    return source
