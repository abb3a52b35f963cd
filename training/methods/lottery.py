"""Adversarial lottery tickets (Wang et al.): iterative global magnitude pruning of a robust dense run, each
round pruning the same fraction and retraining with the robust objective from the surviving weights
*rewound* to an early epoch of the dense run (``--rewind-epoch``), or re-initialised afresh (``--reinit``,
the control: the same procedure, so the masks are found the same way, with a fresh initialisation)."""

from __future__ import annotations

import pathlib

from bcs_tf.errors import ConfigError
from bcs_tf.masks import imp_connectivities
from training.methods.base import Method, Start, read_dense_source
from training.methods.fixed import prune_by_magnitude

REINIT_SEED_OFFSET = 7777  # the fresh initialisation of --reinit is not the dense run's own (seed + 0)


def snapshot_path(run_dir, epoch):
    """Where ``training.run`` keeps the network weights of ``epoch`` (0 = before training)."""
    return pathlib.Path(run_dir) / "snapshots" / f"epoch_{epoch}.weights.h5"


class Lottery(Method):
    """``--prune-rounds`` rounds; every round but the last trains ``--round-epochs`` in ``phases/roundR``."""

    name = "lottery"

    def check_source(self, cfg, input_shape):
        source = read_dense_source(cfg, input_shape)
        if not cfg.reinit and not snapshot_path(cfg.from_run, cfg.rewind_epoch).is_file():
            raise ConfigError(f"--rewind-epoch: {cfg.from_run} kept no weights of epoch {cfg.rewind_epoch} "
                              f"(it kept epochs {source.snapshots}; see --snapshot-epochs)")
        return source

    def early_weights(self, ctx):
        """The dense network the survivors restart from: the rewind snapshot, or a fresh initialisation."""
        cfg = ctx.cfg
        if cfg.reinit:
            return ctx.build("dense", 1.0, precision="float32", seed=cfg.seed + REINIT_SEED_OFFSET)[0]
        early = ctx.build("dense", 1.0, precision="float32")[0]
        early.load_weights(snapshot_path(cfg.from_run, cfg.rewind_epoch))
        return early

    def start(self, ctx):
        cfg = ctx.cfg
        early = self.early_weights(ctx)
        ranked = ctx.source_model()  # round 1 ranks the trained dense weights
        rounds = imp_connectivities(cfg.connectivity, cfg.prune_rounds)
        for r, connectivity in enumerate(rounds, start=1):
            net, allocation = prune_by_magnitude(ctx, connectivity, ranked, early)
            if r == len(rounds):
                break
            ctx.phase(f"round{r}", ctx.trainer(net, allocation), cfg.round_epochs or cfg.epochs)
            ranked = net
        return Start(net, allocation, "random", cfg.lr, {
            "from": cfg.from_run, "round_connectivities": rounds, "round_epochs": cfg.round_epochs or cfg.epochs,
            "restart": "fresh initialisation" if cfg.reinit else f"rewound to epoch {cfg.rewind_epoch}"})
