"""swavkit: SwAV self-supervised online clustering for any timm backbone.

The small public API; everything else lives in its own module (see the README).
"""

from swavkit.config import Config, ConfigError, load_config
from swavkit.model import SwAVModel, build_model, create_backbone
from swavkit.pretrained import LoadError, export_checkpoint, load_backbone, load_swav_model
from swavkit.sinkhorn import sinkhorn
from swavkit.loss import swapped_prediction_loss


def train(cfg, **kwargs):
    """Pretrain with SwAV (see :func:`swavkit.train.train`)."""
    from swavkit.train import train as _train

    return _train(cfg, **kwargs)


__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config", "SwAVModel", "build_model", "create_backbone", "LoadError",
           "export_checkpoint", "load_backbone", "load_swav_model", "sinkhorn", "swapped_prediction_loss", "train",
           "__version__"]
