"""Inverse weights inheritance (Wang et al.): a large dense network of the same family inherits a finished
small sparse robust network's weights (bcs_tf.inheritance says exactly how), then is adversarially trained."""

from __future__ import annotations

from bcs_tf.errors import ConfigError
from bcs_tf.inheritance import inherit_weights
from bcs_tf.models import MODELS
from training.methods.base import Method, Start, read_source


class InverseWeightsInheritance(Method):
    """The final phase trains ``cfg.model`` dense from the inherited initialisation."""

    name = "iwi"

    def check_source(self, cfg, input_shape):
        source = read_source(cfg, input_shape)
        small, large = MODELS[source.model], MODELS[cfg.model]
        if source.width != 1 or cfg.width != 1:
            raise ConfigError("--width: IWI grows small_cnn into small_cnn_x2/_x4, whose channels hold the small "
                              "network's exactly; a fractional width has no such embedding")
        if small.family != large.family:
            raise ConfigError(f"--from: {cfg.from_run} is a {source.model}, not of the {cfg.model} family "
                              f"({large.family})")
        if small.width > large.width:
            raise ConfigError(f"--from: {source.model} is wider than {cfg.model}; IWI grows a small network")
        if source.granularity == "channel":
            raise ConfigError(f"--from: {cfg.from_run} is channel-granular; IWI copies kernels and BatchNorm, so "
                              "its channel gates would be dropped and the inherited network would compute "
                              "something else (inherit from a weight- or block-granular run)")
        if not source.sparse:
            raise ConfigError(f"--from: {cfg.from_run} is dense; IWI inherits from a small sparse network")
        return source

    def start(self, ctx):
        large, _ = ctx.build("dense", 1.0)
        inherit_weights(ctx.source_model(), large)
        return Start(large, None, "dense", ctx.cfg.lr, {"from": ctx.cfg.from_run, "small_model": ctx.source_cfg.model})
