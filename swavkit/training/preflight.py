"""Pre-flight: every check of a run that touches the world, after the config's own checks and before the
first file is written. A typo in the backbone name or a missing ``model.init`` costs no folder scan and
deletes nothing (``--restart`` runs after this)."""

from __future__ import annotations

from swavkit.artifacts.pretrained import LoadError, locate_initial_source
from swavkit.config import Config, ConfigError, validate
from swavkit.core.model import check_backbone_name


def preflight(cfg: Config, world_size: int = 1) -> None:
    """:func:`swavkit.config.validate`, then the backbone name (timm's registry) and the initial weights
    (``model.init`` exists and is readable). Raises ConfigError naming the key."""
    validate(cfg, world_size=world_size)
    check_backbone_name(cfg.model.backbone)
    if cfg.model.init:
        try:
            locate_initial_source(cfg.model.init)
        except LoadError as err:
            raise ConfigError(str(err)) from None


__all__ = ["preflight"]
