"""Training methods by name (``--method``); each lives in a module of its own behind :class:`Method`."""

from bcs_run.config import METHOD_NAMES
from training.methods.base import Context, Method, Start
from training.methods.fixed import Fixed
from training.methods.hydra import Hydra
from training.methods.iwi import InverseWeightsInheritance
from training.methods.lottery import Lottery
from training.methods.scratch import FromScratch

METHODS = {m.name: m for m in (FromScratch("bcs"), FromScratch("random"), FromScratch("dense"), Fixed(), Hydra(),
                               Lottery(), InverseWeightsInheritance())}
assert tuple(METHODS) == METHOD_NAMES

__all__ = ["METHODS", "Context", "Method", "Start"]
