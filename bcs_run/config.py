"""One frozen, validated configuration per run; the CLI maps 1:1 onto it and it is saved beside the run.

Each field's metadata (group, one line of help, choices, shown default) is the single source of the
``training.run`` flags, their ``--help``, their validation and README's flag table (``flag_table``). This
module must not import TensorFlow: flags are checked before it loads (``bcs_run.cli``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import typing
import zipfile

from bcs_run.cli import FlagError
from bcs_run.rundir import RunDir

AUTHORS_NOISE_SIGMA = 1e-6
# the L1 prior that lets channel gates die and regrow without a measured cost (results/README.md, issue 10)
CHANNEL_ALPHA = 1e-3
# The names of the library's registries (tests/test_commands.py checks they match bcs_tf's, which need TensorFlow).
OBJECTIVE_NAMES = ("natural", "at", "mat", "trades", "mart", "rst")
MODEL_NAMES = ("small_cnn", "small_cnn_x2", "small_cnn_x4", "vgg16", "resnet18", "wrn28_2", "wrn28_4", "wrn28_10",
               "mobilenet")
GRANULARITY_NAMES = ("weight", "block", "channel")
DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "svhn_cropped", "synthetic")
PRECISION_NAMES = ("float32", "mixed_bfloat16", "mixed_float16")
BUDGET_MODES = ("global", "layer")
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop")
STRATEGY_NAMES = ("default", "mirrored", "multiworker")
SCHEDULE_NAMES = ("piecewise", "cosine", "constant")
# Training methods (training/methods/ has one module each); those in FROM_METHODS start from another run.
METHOD_NAMES = ("bcs", "random", "dense", "fixed", "hydra", "lottery", "iwi")
FROM_METHODS = ("fixed", "hydra", "lottery", "iwi")
# The flags that only some methods read: set to anything but its default for another method, a flag is refused
# with a one-line error naming the method (the help adds "[--method … only]" from the same table).
METHOD_FLAGS = {
    "from_run": FROM_METHODS,
    "granularity": ("bcs", "random"),
    "block_size": ("bcs", "random"),
    "rewind_epoch": ("lottery",),
    "reinit": ("lottery",),
    "prune_rounds": ("lottery",),
    "round_epochs": ("lottery",),
    "score_epochs": ("hydra",),
    "finetune_lr_factor": ("hydra",),
}
GROUPS = ("data", "model", "sparsity", "objective", "attack", "optimisation", "output")


def flag(default, group, help, choices=None, shown=None, metavar=None):
    """A RunConfig field with its CLI metadata: ``group`` (one of GROUPS), one line of ``help``, the allowed
    ``choices``, the default as ``--help`` shows it (``shown``, for defaults computed from other flags) and the
    value's name in the help (``metavar``; by default N for integers, X for numbers, TEXT for strings)."""
    assert group in GROUPS, group
    return dataclasses.field(default=default, metadata={"group": group, "help": help, "choices": choices,
                                                         "shown": shown, "metavar": metavar})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a training run (field names are the CLI flags with dashes as underscores)."""

    dataset: str = flag("fashion_mnist", "data", "Fashion-MNIST is read offline; CIFAR/SVHN through TFDS; "
                        "synthetic is a small learnable task for tests", DATASET_NAMES)
    data_dir: typing.Optional[str] = flag(None, "data", "where the dataset is (Fashion-MNIST files or TFDS "
                                          "data_dir); given, nothing else is tried",
                                          shown="/usr/share/datasets, Keras cache, TFDS", metavar="DIR")
    val_split: int = flag(5000, "data", "training images held out for validation; the best epoch is chosen on them")
    augment: str = flag("auto", "data", "the authors' random shifts (±10%%) and flips; auto = on for "
                        "CIFAR/SVHN, off for Fashion-MNIST", ("auto", "on", "off"))
    no_flip: bool = flag(False, "data", "augment with shifts only (no horizontal flips)")
    labelled_fraction: float = flag(1.0, "data", "train on the first X of the training set (RST's setting), in (0, 1]")
    extra_data: typing.Optional[str] = flag(None, "data", "RST: pseudo-labelled .npz from `python -m "
                                            "training.pseudolabel`, mixed into every batch",
                                            metavar="FILE.npz")
    extra_fraction: float = flag(0.5, "data", "RST: fraction of each batch drawn from --extra-data, in (0, 1)")
    model: str = flag("small_cnn", "model", "small_cnn (3 conv-BN-ReLU blocks + 128-unit head) is the CPU "
                      "default, _x2/_x4 its wider versions; the rest are the paper's CIFAR networks", MODEL_NAMES)
    width: float = flag(1.0, "model", "multiplier of small_cnn's channels (each layer keeps max(1, round(n·W))): "
                        "e.g. 0.25 for a narrow dense network that fits a microcontroller's flash")
    precision: str = flag("float32", "model", "mixed_bfloat16: bfloat16 compute on AMX/AVX-512-BF16 CPUs and "
                          "GPUs; mixed_float16: float16 compute with dynamic loss scaling (GPU tensor cores); "
                          "θ, γ, the sampler, the test evaluation and model.keras stay float32", PRECISION_NAMES)
    method: str = flag("bcs", "sparsity", "bcs = Langevin rewiring; random = fixed random mask; dense = plain "
                       "Keras layers; fixed/hydra/lottery/iwi start from --from (README: Baselines)", METHOD_NAMES)
    from_run: typing.Optional[str] = flag(None, "sparsity", "the finished run fixed/hydra/lottery prune (a dense "
                                          "one), iwi inherits from (a small sparse one) or lottery --reinit "
                                          "re-initialises (a rewound ticket)", metavar="RUN_DIR")
    connectivity: float = flag(0.01, "sparsity", "fraction of active kernel entries, in (0, 1]; 1 = dense, "
                               "0.01 = 99%% sparsity", metavar="C")
    granularity: str = flag("weight", "sparsity", "what one connection is: a weight; a 1×B block of a dense "
                            "layer's inputs (LiteRT's sparse FC kernels; convolutions keep weights); or a whole "
                            "channel/unit (export compacts the network)", GRANULARITY_NAMES)
    block_size: int = flag(4, "sparsity", "B of --granularity block: 4 for LiteRT's float32 sparse FC kernel, 16 "
                           "for its int8 one")
    budget: typing.Optional[str] = flag(None, "sparsity", "global: one budget int(C·Σ sizes) over all layers "
                                        "(the BCS authors'); layer: round(C·n) in every layer (HYDRA's rule; at "
                                        "channel granularity it holds the compacted size fixed)",
                                        BUDGET_MODES, shown="layer for hydra and --granularity channel, else global")
    temperature: typing.Optional[float] = flag(None, "sparsity", "Langevin temperature T: noise sqrt(2·lr·T)·N(0,1) "
                                               "on active θ", shown="η₀σ²/2 with the authors' σ=1e-6")
    alpha: typing.Optional[float] = flag(None, "sparsity", "extra L1 prior α·Σmax(0,θ) (besides the decoupled "
                                         "weight decay)", shown=f"{CHANNEL_ALPHA:g} at --granularity channel, else 0")
    snapshot_epochs: str = flag("1,2", "sparsity", "keep the network weights after these epochs (and before "
                                "training) in snapshots/, for lottery rewinding", metavar="E1,E2")
    rewind_epoch: int = flag(1, "sparsity", "lottery: rewind surviving weights to this epoch of the --from run "
                             "(0 = its initialisation)")
    reinit: bool = flag(False, "sparsity", "lottery control: train the --from ticket's final masks (a rewound "
                        "lottery run) from a fresh initialisation")
    prune_rounds: int = flag(3, "sparsity", "lottery: rounds of iterative magnitude pruning, the same fraction "
                             "pruned in each")
    round_epochs: typing.Optional[int] = flag(None, "sparsity", "lottery: epochs of every round but the last",
                                              shown="--epochs")
    score_epochs: typing.Optional[int] = flag(None, "sparsity", "hydra: epochs of score learning before "
                                              "fine-tuning", shown="max(1, round(0.2·epochs))")
    finetune_lr_factor: float = flag(0.1, "sparsity", "hydra: fine-tuning learning rate = --lr × this, in (0, 1]")
    objective: str = flag("trades", "objective", "training objective: natural, Madry PGD AT, mixed-batch AT "
                          "(half the batch adversarial), TRADES, MART, or RST (TRADES on pseudo-labelled extra data)",
                          OBJECTIVE_NAMES)
    beta: float = flag(6.0, "objective", "TRADES/MART/RST weight of the robustness term")
    eps: float = flag(0.1, "attack", "L∞ radius of the training, validation and test attacks (inputs in [0, 1])")
    attack_steps: int = flag(10, "attack", "PGD steps of the training and validation attack")
    attack_step_size: typing.Optional[float] = flag(None, "attack", "PGD step size", shown="2.5·eps/attack-steps")
    eval_steps: int = flag(20, "attack", "PGD steps of the final test evaluation (random start)")
    eval_restarts: int = flag(1, "attack", "random restarts of the test PGD (worst case per example)")
    epochs: int = flag(20, "optimisation", "training epochs")
    batch_size: int = flag(128, "optimisation", "examples per step")
    optimizer: str = flag("sgd", "optimisation", "optimizer of θ and the dense weights", OPTIMIZER_NAMES)
    lr: float = flag(0.1, "optimisation", "initial learning rate")
    lr_schedule: str = flag("piecewise", "optimisation", "piecewise: lr and weight decay ×0.1 at 50%% and 75%% "
                            "of training (authors)", SCHEDULE_NAMES)
    momentum: float = flag(0.9, "optimisation", "SGD/RMSprop momentum, in [0, 1)")
    weight_decay: float = flag(5e-4, "optimisation", "decoupled weight decay (the sparsity prior on θ), "
                               "following the learning-rate schedule")
    seed: int = flag(0, "optimisation", "seed of the initialisation, data order, attacks and rewiring")
    max_steps: typing.Optional[int] = flag(None, "optimisation", "stop after N optimizer steps (smoke runs)")
    strategy: str = flag("default", "optimisation", "default: one device; mirrored: data-parallel over every "
                         "local GPU (else every CPU device), the --batch-size split among them; multiworker: "
                         "over the machines of TF_CONFIG, each worker with its own --out (docs/design.md)",
                         STRATEGY_NAMES)
    jit: bool = flag(False, "optimisation", "compile the training step with XLA (jit_compile; often faster on "
                     "GPUs, slower on CPUs here)")
    on_nan: str = flag("stop", "optimisation", "when a step's loss, gradients or weights turn NaN/Inf: stop (files "
                       "untouched, exit 2) or restore the last checkpoint at half the learning rate (≤ 3 times)",
                       ("stop", "restore"))
    checkpoint_every: typing.Optional[int] = flag(None, "output", "also checkpoint every N optimizer steps within an "
                                                  "epoch (0: at epoch ends only)",
                                                  shown="≈ 10 min of training, from the measured step time")
    keep_checkpoints: int = flag(2, "output", "checkpoints kept in checkpoint/ (the newest first)")
    select_by: str = flag("robust", "output", "validation accuracy that chooses the saved epoch, or the last "
                          "epoch (a PGD-selected epoch can be one whose gradients mask: results/README.md)",
                          ("robust", "clean", "last"))
    out: str = flag("runs/default", "output",
                    "run directory (never replaced without --overwrite; locked while a process uses it)", metavar="DIR")

    def __post_init__(self):
        bad = self._bad
        for field in dataclasses.fields(self):
            allowed = field.metadata["choices"]
            if allowed and getattr(self, field.name) not in allowed and not (
                    field.default is None and getattr(self, field.name) is None):
                bad(field.name, f"must be one of {', '.join(allowed)}")
        if not 0.0 < self.connectivity <= 1.0:
            bad("connectivity", "must be in (0, 1] (1 = dense)")
        if self.width != 1.0 and (self.model != "small_cnn" or not self.width > 0):
            bad("width", f"scales small_cnn's channels and must be > 0 (model {self.model})")
        for flag in ("epochs", "batch_size"):
            if getattr(self, flag) < 1:
                bad(flag, "must be ≥ 1")
        if self.eval_steps < 1:
            bad("eval_steps", "the test PGD needs at least one step")
        for flag in ("lr", "weight_decay", "eps", "beta", "attack_steps", "val_split"):
            if getattr(self, flag) < 0:
                bad(flag, "must be ≥ 0")
        if self.alpha is not None and self.alpha < 0:
            bad("alpha", "must be ≥ 0")
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", "must be in [0, 1)")
        if self.attack_step_size is not None and self.attack_step_size < 0:
            bad("attack_step_size", "must be ≥ 0")
        if self.temperature is not None and self.temperature < 0:
            bad("temperature", "must be ≥ 0")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", "must be ≥ 1")
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            bad("checkpoint_every", "must be ≥ 0")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", "must be ≥ 1")
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

    def _bad(self, flag, why):
        raise FlagError(f"--{flag.replace('_', '-')}: {why}. Received: {getattr(self, flag)!r}")

    def _check_method(self):
        bad = self._bad
        if (self.method in FROM_METHODS) != (self.from_run is not None):
            raise FlagError(f"--from: required by --method {', '.join(FROM_METHODS)} and used only by them. "
                            f"Received: method={self.method!r}, from={self.from_run!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for flag, methods in METHOD_FLAGS.items():
            if self.method not in methods and getattr(self, flag) != defaults[flag]:
                raise FlagError(f"--{flag.replace('_', '-')}: does not apply to --method {self.method} (only to "
                                f"{', '.join(methods)}). Received: {getattr(self, flag)!r}")
        if self.method in ("fixed", "hydra", "lottery") and self.connectivity >= 1.0:
            bad("connectivity", f"--method {self.method} prunes, so it must be < 1")
        if self.method == "iwi" and self.connectivity != 1.0:
            bad("connectivity", "--method iwi trains the large network dense, so it must be 1")
        if self.strategy == "multiworker" and self.on_nan == "restore":
            bad("on_nan", "restore is not available with --strategy multiworker (workers would roll back apart)")
        if self.block_size < 2:
            bad("block_size", "must be ≥ 2 (1 is --granularity weight)")
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
        from bcs_tf.data import default_augment

        return default_augment(self.dataset) if self.augment == "auto" else self.augment == "on"

    @property
    def step_size(self):
        """Effective attack step size."""
        if self.attack_step_size is not None:
            return self.attack_step_size
        from bcs_tf.robustness.attacks import default_step_size

        return default_step_size(self.eps, self.attack_steps)

    @property
    def effective_temperature(self):
        """Langevin temperature T (the authors' σ = 1e-6 mapped at the initial learning rate by default)."""
        if self.temperature is not None:
            return self.temperature
        from bcs_tf.connectivity import temperature_from_sigma

        return temperature_from_sigma(AUTHORS_NOISE_SIGMA, self.lr)

    @property
    def effective_alpha(self):
        """L1 prior strength α: ``--alpha``, else CHANNEL_ALPHA for channel gates and 0 for weights and blocks.

        Gates start at θ = 1, far above the weights' |He-normal| magnitudes, so weight decay alone never brings one
        to zero in a run and channel BCS would train a fixed random choice of channels (docs/design.md)."""
        if self.alpha is not None:
            return self.alpha
        return CHANNEL_ALPHA if self.granularity == "channel" else 0.0

    @property
    def effective_budget(self):
        """``--budget``, else k per layer for hydra (its own rule) and for channel granularity, and the BCS
        authors' global budget otherwise. Channels per layer fixed means a fixed compacted size: a layer's
        parameters are its channel count times its input layer's (times the kernel size), so with one global
        channel budget the sampler moves channels into wider layers and the network the board sees grows."""
        if self.budget is not None:
            return self.budget
        return "layer" if self.method == "hydra" or self.granularity == "channel" else "global"

    def attack(self):
        """The training attack."""
        from bcs_tf.robustness.attacks import AttackConfig

        return AttackConfig(eps=self.eps, step_size=self.step_size, steps=self.attack_steps)

    def make_optimizer(self, total_steps, lr=None, scale=1.0):
        """The run's optimizer and schedule (bcs_tf.optim) from ``lr`` (default ``--lr``) × ``scale``."""
        from bcs_tf.optim import make_optimizer

        lr = self.lr if lr is None else lr
        return make_optimizer(self.optimizer, self.lr_schedule, lr, total_steps, self.momentum, self.weight_decay,
                              scale)

    def make_trainer(self, net, allocation=None, rewire=False):
        """A RobustTrainer of ``net`` with this run's objective, attack and sampler settings."""
        from bcs_tf.objectives import make_objective
        from bcs_tf.trainer import RobustTrainer

        return RobustTrainer(net, make_objective(self.objective, self.beta), self.attack(), allocation=allocation,
                             rewire=rewire, temperature=self.effective_temperature, alpha=self.effective_alpha,
                             seed=self.seed, jit=self.jit)

    def to_dict(self):
        """JSON-friendly dict including derived values."""
        return {**dataclasses.asdict(self), "effective_attack_step_size": self.step_size,
                "effective_temperature": self.effective_temperature, "effective_alpha": self.effective_alpha,
                "effective_budget": self.effective_budget}

    @classmethod
    def from_dict(cls, data):
        """Inverse of :meth:`to_dict` (derived keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def finished_network(run_dir):
    """The file holding a finished run's network: ``model.keras``, else the archive ``network.npz`` (a results
    directory keeps only that), else None."""
    return RunDir(run_dir).network()


def load_finished_run(run_dir):
    """``(RunConfig, model)`` of a directory written by ``training.run`` (or of a results directory's archived
    run); CheckpointError when it is not one."""
    import keras

    import bcs_tf  # noqa: F401  (registers the sparse layers for load_model)
    from bcs_tf.errors import CheckpointError

    run_dir = pathlib.Path(run_dir)
    path = finished_network(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} has no model.keras or network.npz (is it a finished `training.run` "
                              "output?)")
    if path.suffix == ".npz":
        from bcs_tf.archive import load_archive

        meta, model = load_archive(path)
        try:
            return RunConfig.from_dict(meta["config"]), model
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} carries no readable run config: {exc}") from None
    try:
        cfg = RunConfig.from_dict(json.loads(RunDir(run_dir).config.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read {RunDir(run_dir).config}: {exc}") from None
    if not zipfile.is_zipfile(path):  # Keras reports a truncated archive as "File not found"
        raise CheckpointError(f"corrupt model {path}: not a complete .keras (zip) archive "
                              f"({path.stat().st_size} bytes; a truncated copy?)")
    try:
        model = keras.models.load_model(path)
    except Exception as exc:  # Keras raises many kinds for a damaged archive
        raise CheckpointError(f"cannot load {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    return cfg, model
