"""One frozen, validated configuration per run; the CLI maps 1:1 onto it and it is saved beside the run."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import typing

from bcs_tf.attacks import AttackConfig
from bcs_tf.connectivity import BUDGET_MODES, temperature_from_sigma
from bcs_tf.data import DATASETS, default_augment
from bcs_tf.errors import CheckpointError, ConfigError
from bcs_tf.models import MODELS, PRECISIONS
from bcs_tf.objectives import OBJECTIVES

AUTHORS_NOISE_SIGMA = 1e-6
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULE_NAMES = ("piecewise", "cosine", "constant")
# Training methods (training/methods/ has one module each); those in FROM_METHODS start from another run.
METHOD_NAMES = ("bcs", "random", "dense", "fixed", "hydra", "lottery", "iwi")
FROM_METHODS = ("fixed", "hydra", "lottery", "iwi")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a training run (field names are the CLI flags with dashes as underscores)."""

    objective: str = "trades"
    method: str = "bcs"
    from_run: typing.Optional[str] = None  # --from: the run fixed/hydra/lottery prune, or the small network of iwi
    connectivity: float = 0.01
    budget: str = "global"
    dataset: str = "fashion_mnist"
    data_dir: typing.Optional[str] = None
    labelled_fraction: float = 1.0
    extra_data: typing.Optional[str] = None
    extra_fraction: float = 0.5
    augment: str = "auto"  # auto: on for cifar10/cifar100/svhn_cropped (authors), off otherwise
    no_flip: bool = False
    model: str = "small_cnn"
    epochs: int = 20
    batch_size: int = 128
    precision: str = "float32"  # mixed_bfloat16: bfloat16 compute (AMX/AVX-512-BF16 CPUs, GPUs); saved model is float32
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_schedule: str = "piecewise"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 0.1
    attack_steps: int = 10
    attack_step_size: typing.Optional[float] = None  # default 2.5·eps/steps (authors: 2/255 for 8/255, 10 steps)
    beta: float = 6.0
    alpha: float = 0.0
    temperature: typing.Optional[float] = None  # default: the authors' sigma=1e-6 at the initial lr
    seed: int = 0
    max_steps: typing.Optional[int] = None
    val_split: int = 5000
    eval_steps: int = 20
    eval_restarts: int = 1
    select_by: str = "robust"
    snapshot_epochs: str = "1,2"  # network weights kept after these epochs (and before training) for rewinding
    rewind_epoch: int = 1  # lottery: rewind surviving weights to this epoch of the dense run (0 = its init)
    reinit: bool = False  # lottery control: same masks, fresh initialisation instead of rewinding
    prune_rounds: int = 3  # lottery: iterative magnitude pruning rounds, the same fraction pruned each round
    round_epochs: typing.Optional[int] = None  # lottery: epochs of every round but the last (default --epochs)
    score_epochs: typing.Optional[int] = None  # hydra: score-learning epochs (default max(1, round(0.2·epochs)))
    finetune_lr_factor: float = 0.1  # hydra: fine-tuning learning rate = lr × this (HYDRA: 0.01 after 0.1)
    out: str = "runs/default"

    def __post_init__(self):
        def bad(flag, why):
            raise ConfigError(f"--{flag.replace('_', '-')}: {why}. Received: {getattr(self, flag)!r}")

        choices = {"objective": sorted(OBJECTIVES), "method": METHOD_NAMES, "budget": BUDGET_MODES,
                   "dataset": DATASETS, "model": sorted(MODELS), "select_by": ("robust", "clean"),
                   "optimizer": OPTIMIZER_NAMES, "lr_schedule": SCHEDULE_NAMES,
                   "augment": ("auto", "on", "off"), "precision": PRECISIONS}
        for flag, allowed in choices.items():
            if getattr(self, flag) not in allowed:
                bad(flag, f"must be one of {', '.join(allowed)}")
        if not 0.0 < self.connectivity <= 1.0:
            bad("connectivity", "must be in (0, 1] (1 = dense)")
        for flag in ("epochs", "batch_size"):
            if getattr(self, flag) < 1:
                bad(flag, "must be ≥ 1")
        for flag in ("lr", "weight_decay", "eps", "beta", "alpha", "attack_steps", "eval_steps", "val_split"):
            if getattr(self, flag) < 0:
                bad(flag, "must be ≥ 0")
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", "must be in [0, 1)")
        if self.attack_step_size is not None and self.attack_step_size < 0:
            bad("attack_step_size", "must be ≥ 0")
        if self.temperature is not None and self.temperature < 0:
            bad("temperature", "must be ≥ 0")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", "must be ≥ 1")
        if self.eval_restarts < 1:
            bad("eval_restarts", "must be ≥ 1")
        if not 0.0 < self.labelled_fraction <= 1.0:
            bad("labelled_fraction", "must be in (0, 1]")
        if not 0.0 < self.extra_fraction < 1.0:
            bad("extra_fraction", "must be in (0, 1)")
        if (self.objective == "rst") != (self.extra_data is not None):
            bad("extra_data", "is required by --objective rst and used only by it")
        if self.objective != "natural" and self.attack_steps < 1:
            bad("attack_steps", f"objective {self.objective} needs at least one attack step")
        self._check_method()

    def _check_method(self):
        def bad(flag, why):
            raise ConfigError(f"--{flag.replace('_', '-')}: {why}. Received: {getattr(self, flag)!r}")

        if (self.method in FROM_METHODS) != (self.from_run is not None):
            raise ConfigError(f"--from: required by --method {', '.join(FROM_METHODS)} and used only by them. "
                              f"Received: method={self.method!r}, from={self.from_run!r}")
        if self.method in ("fixed", "hydra", "lottery") and self.connectivity >= 1.0:
            bad("connectivity", f"--method {self.method} prunes, so it must be < 1")
        if self.method == "iwi" and self.connectivity != 1.0:
            bad("connectivity", "--method iwi trains the large network dense, so it must be 1")
        if self.reinit and self.method != "lottery":
            bad("reinit", "is the control of --method lottery and used only by it")
        for flag in ("rewind_epoch",):
            if getattr(self, flag) < 0:
                bad(flag, "must be ≥ 0")
        for flag in ("prune_rounds", "round_epochs", "score_epochs"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                bad(flag, "must be ≥ 1")
        if not 0.0 < self.finetune_lr_factor <= 1.0:
            bad("finetune_lr_factor", "must be in (0, 1]")
        try:
            epochs = self.snapshots[1:]
        except ValueError:
            epochs = (0,)
        if any(e < 1 for e in epochs):
            bad("snapshot_epochs", "must be comma-separated epoch numbers ≥ 1")

    @property
    def snapshots(self):
        """Epochs after which the network weights are kept (epoch 0, the initialisation, is always kept)."""
        return (0,) + tuple(int(e) for e in self.snapshot_epochs.split(",") if e.strip())

    @property
    def sparse(self):
        """Whether the network uses sparse layers (every method but dense, with connectivity < 1)."""
        return self.method != "dense" and self.connectivity < 1.0

    @property
    def augmented(self):
        """Whether training batches get the authors' shift (and flip) augmentation."""
        return default_augment(self.dataset) if self.augment == "auto" else self.augment == "on"

    @property
    def step_size(self):
        """Effective attack step size."""
        if self.attack_step_size is not None:
            return self.attack_step_size
        return 2.5 * self.eps / max(self.attack_steps, 1)

    @property
    def effective_temperature(self):
        """Langevin temperature T (the authors' σ = 1e-6 mapped at the initial learning rate by default)."""
        if self.temperature is not None:
            return self.temperature
        return temperature_from_sigma(AUTHORS_NOISE_SIGMA, self.lr)

    def attack(self):
        """The training attack."""
        return AttackConfig(eps=self.eps, step_size=self.step_size, steps=self.attack_steps)

    def to_dict(self):
        """JSON-friendly dict including derived values."""
        return {**dataclasses.asdict(self), "effective_attack_step_size": self.step_size,
                "effective_temperature": self.effective_temperature}

    @classmethod
    def from_dict(cls, data):
        """Inverse of :meth:`to_dict` (derived keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def load_finished_run(run_dir):
    """``(RunConfig, model)`` of a directory written by ``training.run``; CheckpointError when it is not one."""
    import keras

    import bcs_tf  # noqa: F401  (registers the sparse layers for load_model)

    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "model.keras").is_file():
        raise CheckpointError(f"{run_dir} has no model.keras (is it a finished `training.run` output?)")
    try:
        cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read {run_dir / 'config.json'}: {exc}") from None
    try:
        model = keras.models.load_model(run_dir / "model.keras")
    except Exception as exc:  # Keras raises many kinds for a damaged archive
        raise CheckpointError(f"cannot load {run_dir / 'model.keras'}: {type(exc).__name__}: {str(exc)[:200]}") \
            from None
    return cfg, model
