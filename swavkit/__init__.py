"""swavkit: SwAV self-supervised online clustering for any timm backbone.

The small public API; everything else lives in its own module (see the README).
"""

from swavkit.config import Config, ConfigError, load_config
from swavkit.model import SwAVModel, build_model, create_backbone
from swavkit.pretrained import LoadError, export_checkpoint, load_backbone, load_swav_model
from swavkit.sinkhorn import sinkhorn
from swavkit.loss import swapped_prediction_loss


def extract_features(*args, **kwargs):
    """Frozen-backbone features and labels of a labelled folder (see :func:`swavkit.features.extract_features`)."""
    from swavkit.features import extract_features as _extract

    return _extract(*args, **kwargs)


def evaluate_knn(*args, **kwargs):
    """k-NN benchmark of a backbone source on train/val folders (see :func:`swavkit.knn.evaluate_knn`)."""
    from swavkit.knn import evaluate_knn as _evaluate

    return _evaluate(*args, **kwargs)


def evaluate_linear(*args, **kwargs):
    """Linear-probe benchmark (see :func:`swavkit.linear_probe.evaluate_linear`)."""
    from swavkit.linear_probe import evaluate_linear as _evaluate

    return _evaluate(*args, **kwargs)


def train(cfg, **kwargs):
    """Pretrain with SwAV (see :func:`swavkit.train.train`)."""
    from swavkit.train import train as _train

    return _train(cfg, **kwargs)


__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config", "SwAVModel", "build_model", "create_backbone", "LoadError",
           "export_checkpoint", "load_backbone", "load_swav_model", "sinkhorn", "swapped_prediction_loss", "train",
           "extract_features", "evaluate_knn", "evaluate_linear",
           "__version__"]
