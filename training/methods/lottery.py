"""Adversarial lottery tickets (Wang et al.): iterative global magnitude pruning of a robust dense run, each
round pruning the same fraction and retraining with the robust objective from the surviving weights
*rewound* to an early epoch of the dense run (``--rewind-epoch``, 0 = its initialisation).

The control ``--reinit`` answers "does the rewound initialisation matter, or only the mask?": it takes a
finished rewound lottery run as ``--from`` and trains exactly that ticket's final masks from a fresh
initialisation (Frankle & Carbin's random re-initialisation control), so the two runs differ in nothing else.
"""

from __future__ import annotations

from keras import ops

from bcs_run.rundir import RunDir
from bcs_tf.errors import ConfigError
from bcs_tf.layers import sparse_layers
from bcs_tf.masks import imp_connectivities, static_masked_network
from training.methods.base import Method, Start, read_dense_source, read_source
from training.methods.fixed import prune_by_magnitude

REINIT_SEED_OFFSET = 7777  # the fresh initialisation of --reinit is not the dense run's own (seed + 0)


def ticket_masks(net, ticket):
    """The active-entry masks of the finished sparse network ``ticket``, in the layer order of ``net``."""
    by_name = {layer.name: layer for layer in sparse_layers(ticket)}
    return [ops.convert_to_numpy(by_name[layer.name].theta) > 0 for layer in sparse_layers(net)]


class Lottery(Method):
    """``--prune-rounds`` rounds; every round but the last trains ``--round-epochs`` in ``phases/roundR``. With
    ``--reinit`` no pruning happens: the ``--from`` ticket's masks start from a fresh initialisation."""

    name = "lottery"

    def check_source(self, cfg, input_shape):
        if cfg.reinit:
            return self._check_ticket(cfg, input_shape)
        source = read_dense_source(cfg, input_shape)
        if not RunDir(cfg.from_run).snapshot(cfg.rewind_epoch).is_file():
            raise ConfigError(f"--rewind-epoch: {cfg.from_run} kept no weights of epoch {cfg.rewind_epoch} "
                              f"(it kept epochs {source.snapshots}; see --snapshot-epochs)")
        return source

    @staticmethod
    def _check_ticket(cfg, input_shape):
        source = read_source(cfg, input_shape)
        if source.method != "lottery" or source.reinit:
            raise ConfigError(f"--reinit: --from must be a finished rewound lottery run, whose ticket it trains "
                              f"from a fresh initialisation; {cfg.from_run} is a {source.method} run"
                              + (" with --reinit" if source.reinit else ""))
        if (source.model, source.width, source.connectivity, source.effective_budget) != (
                cfg.model, cfg.width, cfg.connectivity, cfg.effective_budget):
            raise ConfigError(f"--reinit: the ticket {cfg.from_run} is a {source.model} at connectivity "
                              f"{source.connectivity} (budget {source.effective_budget}), this run a {cfg.model} at "
                              f"{cfg.connectivity} (budget {cfg.effective_budget})")
        return source

    def start(self, ctx):
        cfg = ctx.cfg
        if cfg.reinit:
            fresh = ctx.build("dense", 1.0, precision="float32", seed=cfg.seed + REINIT_SEED_OFFSET)[0]
            net, allocation = ctx.build("random")
            net, allocation = static_masked_network(net, allocation, ticket_masks(net, ctx.source_model()), fresh)
            return Start(net, allocation, "random", cfg.lr, {"from": cfg.from_run,
                                                             "restart": "fresh initialisation of the ticket's masks"})
        early = ctx.build("dense", 1.0, precision="float32")[0]
        early.load_weights(RunDir(cfg.from_run).snapshot(cfg.rewind_epoch))
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
            "restart": f"rewound to epoch {cfg.rewind_epoch}"})
