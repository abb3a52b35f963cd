"""Methods that start from a fresh network: BCS (rewiring), a random static mask, and the dense baseline."""

from __future__ import annotations

from training.methods.base import Method, Start


class FromScratch(Method):
    """Build ``cfg.model`` with ``kind`` layers at the run's connectivity and train it."""

    def __init__(self, kind):
        self.name = self.kind = kind

    def start(self, ctx):
        net, allocation = ctx.build(self.kind)
        return Start(net, allocation, self.kind if allocation is not None else "dense", ctx.cfg.lr)
