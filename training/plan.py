"""What a reproduction runs: the presets, every run a table of the two seed papers needs (flags, sources,
evaluations, relative cost), in dependency and value order, and the command lines that train and evaluate a run.
``training.tables`` and ``training.claims`` read the same plan."""

from __future__ import annotations

import dataclasses
import sys

from bcs_run.config import RunConfig

TABLES = ("bcs", "hydra", "sparsity")
BCS_OBJECTIVES = ("natural", "at", "mat", "trades", "mart")  # the rows of the BCS paper's tables
SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)
EXTREME_SPARSITIES = (0.99, 0.9)  # the sparsity table's most telling columns, run first for every seed
SPARSITY_METHODS = ("fixed", "lottery", "lottery_rw0", "lottery_reinit", "bcs", "hydra")
FULL_ATTACKS = ("clean", "fgsm", "pgd50", "pgd100", "autoattack", "bb")
AA_ATTACKS = ("clean", "autoattack")  # eval_aa.json: AutoAttack (and the clean accuracy it starts from)
# added to eval_aa.json of the HYDRA table's runs: the BCS paper's B&B row, and its FGSM and PGD rows again on
# AutoAttack's images, so that every gradient-masking gap (PGD-50 − B&B, PGD-50 − AA) compares one image set
BB_ATTACKS = ("fgsm", "pgd50", "pgd100", "bb")
# relative cost of one epoch (AT PGD-10 on small_cnn = 1), for the ETA before the first run has finished
OBJECTIVE_COST = {"natural": 0.25, "at": 1.0, "mat": 0.6, "trades": 1.4, "mart": 1.05}
RUN_OVERHEAD = 0.6  # start-up, the final test PGD-20 on 10,000 images and the evaluation, in the same units
AA_COST = 5.0  # AutoAttack on 1,000 test images of small_cnn, in the same units
BB_COST = 1.0  # B&B on the same 1,000

PRESETS = {
    # 3 seeds of every robust cell, compute-matched controls, PGD-50 on all 10,000 test images and AutoAttack on
    # 1,000 for the 99% models and the 90% BCS / Fixed / HYDRA ones: 234 runs, ≈ 25 h of 2-core machine time
    "quick": {"epochs": 5, "val_split": 1000, "eval_examples": 10000, "bcs_objectives": ("natural", "at", "trades"),
              "sparsity_epochs": 3, "prune_rounds": 2, "round_epochs": 1, "eps": 0.1, "seeds": 3, "matched": True,
              "aa_examples": 1000},
    # a few seconds per run on the synthetic task: for tests of the orchestration, not for results
    "smoke": {"epochs": 2, "val_split": 128, "eval_examples": 64, "bcs_objectives": ("at",), "sparsity_epochs": 1,
              "prune_rounds": 2, "round_epochs": 1, "eps": 0.1},
    # the one-seed 20-epoch table of results/fashion_mnist-full (its settings stay as they were made)
    "full": {"epochs": 20, "val_split": 5000, "eval_examples": 1000, "bcs_objectives": BCS_OBJECTIVES,
             "sparsity_epochs": 20, "prune_rounds": 3, "round_epochs": 10, "eps": 0.1},
}


@dataclasses.dataclass
class RunSpec:
    """One training run: its id (its directory under the runs dir), flags, dependencies and evaluation
    (``attacks`` on the preset's ``eval_examples`` into eval.json; ``aa``: AutoAttack on ``aa_examples`` into
    eval_aa.json, and with ``bb`` B&B, FGSM, PGD-50 and PGD-100 on the same images) and the epoch ``snapshots`` its
    collected copy keeps."""

    id: str
    flags: dict
    deps: tuple = ()
    attacks: tuple = ("clean", "pgd50")
    aa: bool = False
    bb: bool = False
    snapshots: tuple = ()  # epochs whose kept weights its collected copy holds: planned lottery tickets rewind to them

    @property
    def reports(self):
        """``{report name: attacks}`` of this run's evaluation: ``eval`` and, when asked for, ``eval_aa``."""
        if not self.aa:
            return {"eval": self.attacks}
        return {"eval": self.attacks, "eval_aa": AA_ATTACKS + (BB_ATTACKS if self.bb else ())}

    @property
    def rewind_epoch(self):
        """The epoch of ``--from`` whose kept weights a rewound lottery ticket reads, else None: every other method
        reads only the source's finished network."""
        if self.flags["method"] != "lottery" or self.flags.get("reinit"):
            return None
        return self.flags.get("rewind_epoch", RunConfig.rewind_epoch)

    @property
    def total_epochs(self):
        """Epochs of this run's own phases (score learning and intermediate pruning rounds included)."""
        epochs = self.flags["epochs"]
        if self.flags["method"] == "hydra":  # training.run's default score phase when the flag is not given
            epochs += self.flags.get("score_epochs") or max(1, round(0.2 * self.flags["epochs"]))
        if self.flags["method"] == "lottery" and not self.flags.get("reinit"):
            epochs += (self.flags["prune_rounds"] - 1) * self.flags["round_epochs"]
        return epochs

    @property
    def width(self):
        """The model's cost relative to small_cnn."""
        return {"small_cnn_x2": 3.0, "small_cnn_x4": 9.0}.get(self.flags.get("model"), 1.0)

    @property
    def cost(self):
        """Estimated cost in AT-epoch units (for the ETA)."""
        return ((self.total_epochs * OBJECTIVE_COST[self.flags["objective"]] + RUN_OVERHEAD) * self.width
                + self.attack_cost(AA_ATTACKS + BB_ATTACKS if self.bb else AA_ATTACKS if self.aa else ()))

    def attack_cost(self, attacks):
        """Estimated cost of the AutoAttack and B&B among ``attacks`` in the same units (the cheap attacks of
        eval.json are in :data:`RUN_OVERHEAD`): what re-evaluating an archived network costs."""
        return self.width * (AA_COST * ("autoattack" in attacks) + BB_COST * ("bb" in attacks))


def _conn(sparsity):
    return round(1.0 - sparsity, 6)


AA_SCOPES = ("preset", "99", "none")
AA_DEFAULT_EXAMPLES = 1000


def _wants_aa(objective, method, connectivity, scope):
    """AutoAttack for every robust 99% model and, in the ``preset`` scope, the 90% BCS, Fixed and HYDRA ones (not
    the 50/80/95% columns of the sparsity table: their PGD-50 on all 10,000 images is what that table reads)."""
    if scope == "none" or objective == "natural" or method == "dense":
        return False
    return connectivity <= 0.01 or (scope == "preset" and connectivity == 0.1 and method in ("bcs", "fixed", "hydra"))


class Plan:
    """The runs the requested tables need, deduplicated, in dependency order and, across tables, in the order of
    value (see :func:`plan`)."""

    def __init__(self, dataset, preset, seeds, full_eval, aa="preset"):
        self.dataset, self.preset, self.p, self.full_eval = dataset, preset, dict(PRESETS[preset]), full_eval
        if aa == "99":  # e.g. the full preset's 99% models, which its own settings do not attack with AutoAttack
            self.p.setdefault("aa_examples", AA_DEFAULT_EXAMPLES)
        self.aa = "none" if not self.p.get("aa_examples") else aa
        self.seeds = seeds or self.p.get("seeds", 1)
        self.runs = {}

    def add(self, spec):
        """Add ``spec`` (a run planned twice keeps one entry, with the union of both plans' attacks); returns the
        entry."""
        if spec.id in self.runs:
            old = self.runs[spec.id]
            old.attacks = tuple(dict.fromkeys(old.attacks + spec.attacks))
            old.aa, old.bb = old.aa or spec.aa, old.bb or spec.bb
            return old
        for dep in spec.deps:
            if dep not in self.runs:
                raise AssertionError(f"{spec.id} depends on {dep}, which is not planned before it")
        if spec.rewind_epoch is not None:
            source = self.runs[spec.deps[0]]
            source.snapshots = tuple(sorted(set(source.snapshots) | {spec.rewind_epoch}))
        if self.full_eval:
            spec.attacks = tuple(dict.fromkeys(spec.attacks + FULL_ATTACKS))
        self.runs[spec.id] = spec
        return spec

    def run(self, objective, method, connectivity, seed, epochs=None, source=None, attacks=("clean", "pgd50"),
            tag="", bb=False, **extra):
        """Plan one run (and return its id); ``bb``: B&B (and FGSM and PGD again) beside its AutoAttack, when it gets
        AutoAttack."""
        name = method if connectivity >= 1 else f"{method}_c{connectivity:g}"
        rid = f"{objective}/{name}{tag}_s{seed}"
        flags = {"objective": objective, "method": method, "connectivity": connectivity, "dataset": self.dataset,
                 "epochs": epochs or self.p["epochs"], "val_split": self.p["val_split"], "eps": self.p["eps"],
                 "seed": seed, **extra}
        if objective == "natural":  # no robustness to select by: the best epoch is the best clean one
            flags["select_by"] = "clean"
        if source:
            flags["from"] = source
        aa = _wants_aa(objective, method, connectivity, self.aa)
        return self.add(RunSpec(rid, flags, (source,) if source else (), tuple(attacks), aa, bb and aa)).id

    @property
    def matched_epochs(self):
        """Total epochs of Fixed (dense pre-training + fine-tuning): what the compute-matched controls train."""
        return 2 * self.p["epochs"]

    def _bcs_cells(self, objective, seed, connectivities):
        dense = self.run(objective, "dense", 1.0, seed)
        for c in connectivities:
            self.run(objective, "fixed", c, seed, source=dense)
            self.run(objective, "random", c, seed)
            self.run(objective, "bcs", c, seed)
            if self.p.get("matched") and objective != "natural":
                e = self.matched_epochs
                self.run(objective, "bcs", c, seed, epochs=e, tag=f"_e{e}")
                self.run(objective, "random", c, seed, epochs=e, tag=f"_e{e}")
        return dense

    def _robust_objectives(self):
        return [o for o in self.p["bcs_objectives"] if o != "natural"]

    def bcs_99(self):
        """The 99% columns of the robust rows (with their compute-matched controls), seed by seed."""
        for seed in range(self.seeds):
            for objective in self._robust_objectives():
                self._bcs_cells(objective, seed, (0.01,))

    def bcs_rest(self):
        """The 90% columns, the long dense control and the natural-training row."""
        for seed in range(self.seeds):
            for objective in self.p["bcs_objectives"]:
                self._bcs_cells(objective, seed, (0.1, 0.01))
                if self.p.get("matched") and objective != "natural":
                    self.run(objective, "dense", 1.0, seed, epochs=self.matched_epochs, tag=f"_e{self.matched_epochs}")

    def hydra_table(self):
        """HYDRA (from the dense run of its objective and seed) against BCS at 90% and 99%, AT and TRADES; B&B
        beside AutoAttack, as in the BCS paper's HYDRA table."""
        attacks = ("clean", "fgsm", "pgd50", "pgd100")
        for seed in range(self.seeds):
            for objective in ("at", "trades"):
                dense = self.run(objective, "dense", 1.0, seed)
                for c in (0.01, 0.1):
                    self.run(objective, "hydra", c, seed, source=dense, attacks=attacks, bb=True)
                    self.run(objective, "bcs", c, seed, attacks=attacks, bb=True)
                    if self.p.get("matched"):
                        e = self.matched_epochs
                        self.run(objective, "bcs", c, seed, epochs=e, tag=f"_e{e}", attacks=attacks, bb=True)

    def sparsity_table(self):
        """Wang et al.'s runs against sparsity: dense, Fixed, HYDRA, lottery tickets (and their controls), BCS,
        natural pruning and inverse weights inheritance. Every seed of the extremes (99% and 90%) and of IWI comes
        before the middle sparsities, so that a stopped reproduction has its most telling cells with all seeds."""
        p, seeds = self.p, range(self.seeds)
        e = p["sparsity_epochs"]
        dense = {seed: self.run("at", "dense", 1.0, seed, epochs=e, tag=f"_e{e}") for seed in seeds}
        for seed in seeds:
            if p.get("matched"):  # Wang et al.'s "natural pruning": the mask and weights of a naturally trained
                natural = self.run("natural", "dense", 1.0, seed, epochs=e, tag=f"_e{e}")  # network, then AT
                for c in (0.1, 0.01):
                    self.run("at", "fixed", c, seed, epochs=e, source=natural, tag=f"_natsrc_e{e}")
            for s in EXTREME_SPARSITIES:
                self._sparsity_cells(s, seed, dense[seed])
        for seed in seeds:
            if p.get("matched"):
                self.run("at", "dense", 1.0, seed, epochs=2 * e, tag=f"_e{2 * e}")
            small = self.run("at", "bcs", 0.1, seed, epochs=e, tag=f"_e{e}")
            self.run("at", "iwi", 1.0, seed, epochs=e, source=small, tag=f"_x2_e{e}", model="small_cnn_x2")
            self.run("at", "dense", 1.0, seed, epochs=e, tag=f"_x2_e{e}", model="small_cnn_x2")
            if p.get("matched"):  # plain AT of the large network for IWI's total (small network + IWI)
                self.run("at", "dense", 1.0, seed, epochs=2 * e, tag=f"_x2_e{2 * e}", model="small_cnn_x2")
        for seed in seeds:
            for s in sorted(set(SPARSITIES[1:]) - set(EXTREME_SPARSITIES), reverse=True):
                self._sparsity_cells(s, seed, dense[seed])

    def _sparsity_cells(self, sparsity, seed, dense):
        """The sparsity table's runs at one sparsity: Fixed, the lottery ticket and its controls, BCS, HYDRA."""
        p, c = self.p, _conn(sparsity)
        e = p["sparsity_epochs"]
        lottery = {"prune_rounds": p["prune_rounds"], "round_epochs": p["round_epochs"]}
        self.run("at", "fixed", c, seed, epochs=e, source=dense, tag=f"_e{e}")
        ticket = self.run("at", "lottery", c, seed, epochs=e, source=dense, tag=f"_e{e}", **lottery)
        self.run("at", "lottery", c, seed, epochs=e, source=ticket, tag=f"_reinit_e{e}", reinit=True)
        if p.get("matched"):
            self.run("at", "lottery", c, seed, epochs=e, source=dense, tag=f"_rw0_e{e}", rewind_epoch=0, **lottery)
        self.run("at", "bcs", c, seed, epochs=e, tag=f"_e{e}")
        self.run("at", "hydra", c, seed, epochs=e, source=dense, tag=f"_e{e}")
        if p.get("matched"):  # BCS for as many epochs as Fixed spends (dense pre-training included)
            self.run("at", "bcs", c, seed, epochs=2 * e, tag=f"_e{2 * e}")


def plan(tables, dataset, preset, seeds=None, full_eval=False, aa="preset"):
    """The :class:`Plan` of ``tables`` (``seeds`` None: the preset's). Across tables the runs come in the order of
    value: the 99% columns of the robust BCS rows with their controls, then HYDRA, then the rest of the BCS
    table, then the sparsity table and IWI."""
    p = Plan(dataset, preset, seeds, full_eval, aa)
    for table, part in (("bcs", p.bcs_99), ("hydra", p.hydra_table), ("bcs", p.bcs_rest),
                        ("sparsity", p.sparsity_table)):
        if table in tables:
            part()
    return p


# ---- execution ---------------------------------------------------------------------------------------------


def sparsity_group(method, sparsity, epochs, matched=False):
    """The group of ``method`` at ``sparsity`` in the sparsity table (``matched``: the compute-matched BCS or
    dense control, trained twice as long)."""
    if sparsity == 0:
        return f"at/dense_e{2 * epochs if matched else epochs}"
    c = f"{round(1 - sparsity, 6):g}"
    tag = {"lottery_reinit": "_reinit", "lottery_rw0": "_rw0"}.get(method, "")
    method = "lottery" if method.startswith("lottery") else method
    return f"at/{method}_c{c}{tag}_e{2 * epochs if matched else epochs}"


def train_command(spec, runs_dir, archived=()):
    """The ``python -m training.run`` command line of ``spec``: ``--from`` is the source's directory in
    ``runs_dir``, or its archived run in ``out/runs`` when it is in ``archived`` (a dict id -> directory)."""
    cmd = [sys.executable, "-m", "training.run"]
    for key, value in spec.flags.items():
        flag = "--" + key.replace("_", "-")
        if key == "from":
            value = archived[value] if value in archived else runs_dir / value
        if value is True:
            cmd.append(flag)
        elif value is not False and value is not None:
            cmd += [flag, str(value)]
    return cmd + ["--out", str(runs_dir / spec.id), "--verbose", "2"]


def eval_commands(spec, runs_dir, p):
    """``{report name: python -m training.evaluate command line}`` of ``spec``'s :attr:`RunSpec.reports` on its
    directory in ``runs_dir``: eval.json on the preset's ``eval_examples``, eval_aa.json on ``aa_examples``. Each
    resumes its report, so a report that lacks some attacks gains them and keeps the rest."""
    def command(name, attacks):
        n = p["eval_examples"] if name == "eval" else p["aa_examples"]
        return [sys.executable, "-m", "training.evaluate", str(runs_dir / spec.id), "--attacks", ",".join(attacks),
                "--n-examples", str(n), "--name", name, "--resume", "--verbose", "2", "--no-report"]

    return {name: command(name, attacks) for name, attacks in spec.reports.items()}


