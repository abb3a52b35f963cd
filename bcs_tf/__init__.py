"""bcs-tf: adversarially robust sparse networks by Bayesian connectivity sampling (TensorFlow 2 / Keras 3).

Importing the package registers the sparse layers with Keras, so ``keras.models.load_model`` can read
models saved by ``training.run``.
"""

from bcs_tf.robustness.attacks import AttackConfig, fgsm, pgd, pgd_restarts
from bcs_tf.connectivity import ConnectivitySampler, allocate_budget, connectivity_report
from bcs_tf.errors import BcsError, CheckpointError, ConfigError, DataError
from bcs_tf.hydra import HydraScoreTrainer
from bcs_tf.inheritance import inherit_weights
from bcs_tf.layers import SparseConv2D, SparseDense, sparse_layers
from bcs_tf.masks import magnitude_masks, static_masked_network
from bcs_tf.models import build_model
from bcs_tf.objectives import make_objective
from bcs_tf.trainer import RobustTrainer

__all__ = [
    "AttackConfig", "BcsError", "CheckpointError", "ConfigError", "ConnectivitySampler", "DataError",
    "HydraScoreTrainer", "RobustTrainer", "SparseConv2D", "SparseDense", "allocate_budget", "build_model",
    "connectivity_report", "fgsm", "inherit_weights", "magnitude_masks", "make_objective", "pgd", "pgd_restarts",
    "sparse_layers", "static_masked_network",
]
__version__ = "0.1.0"
