"""Fixed (the BCS paper's baseline; Wang et al.'s one-shot adversarial pruning): a static mask by global
magnitude from a robustly pre-trained dense run, then its surviving weights trained with the same objective."""

from __future__ import annotations

from bcs_tf.layers import sparse_layers
from bcs_tf.masks import kernels, magnitude_masks, static_masked_network
from training.methods.base import Method, Start, read_dense_source


def prune_by_magnitude(ctx, connectivity, ranked, weights):
    """A static network at ``connectivity`` keeping the largest |w| of ``ranked``, starting from ``weights``.

    Returns ``(net, allocation)``; every weight of the new network (masked kernels, BatchNorm, biases) comes
    from the network ``weights``.
    """
    net, allocation = ctx.build("random", connectivity)
    magnitudes = kernels(ranked)
    masks = magnitude_masks([magnitudes[layer.name] for layer in sparse_layers(net)], allocation)
    return static_masked_network(net, allocation, masks, weights)


class Fixed(Method):
    """One-shot global magnitude pruning of the ``--from`` dense run, then robust training on the fixed mask."""

    name = "fixed"

    def check_source(self, cfg, input_shape):
        return read_dense_source(cfg, input_shape)

    def start(self, ctx):
        dense = ctx.source_model()
        net, allocation = prune_by_magnitude(ctx, ctx.cfg.connectivity, dense, dense)
        return Start(net, allocation, "random", ctx.cfg.lr, {"from": ctx.cfg.from_run, "pruning": "one-shot global "
                     "magnitude" if ctx.cfg.effective_budget == "global" else "one-shot per-layer magnitude"})
