"""HYDRA (Sehwag et al., NeurIPS 2020): learn importance scores on the frozen pre-trained dense network with
the robust loss (top-k subnetwork forward, straight-through gradient to the scores), then fine-tune the
surviving weights with the robust objective on the frozen mask at a 10× smaller learning rate."""

from __future__ import annotations

import numpy as np

from bcs_tf.hydra import HydraScoreTrainer
from bcs_tf.layers import sparse_layers
from bcs_tf.masks import static_masked_network, transfer
from bcs_tf.objectives import make_objective
from training.methods.base import Method, Start, read_dense_source


class Hydra(Method):
    """Score phase (``--score-epochs``) in ``phases/hydra_scores``, then fine-tuning as the final phase."""

    name = "hydra"

    def check_source(self, cfg, input_shape):
        return read_dense_source(cfg, input_shape)

    def start(self, ctx):
        cfg = ctx.cfg
        dense = ctx.source_model()
        net, allocation = ctx.build("random")
        transfer(dense, net, {layer.name: np.ones(tuple(layer.theta.shape), bool) for layer in sparse_layers(net)})
        scorer = HydraScoreTrainer(net, make_objective(cfg.objective, cfg.beta), cfg.attack(), allocation,
                                   seed=cfg.seed, jit=cfg.jit)
        epochs = cfg.score_epochs or max(1, round(0.2 * cfg.epochs))
        ctx.phase("hydra_scores", scorer, epochs)
        masks = scorer.masks()
        final, allocation = static_masked_network(ctx.build("random")[0], allocation, masks, net)
        return Start(final, allocation, "random", cfg.lr * cfg.finetune_lr_factor,
                     {"from": cfg.from_run, "score_epochs": epochs, "finetune_lr": cfg.lr * cfg.finetune_lr_factor})
