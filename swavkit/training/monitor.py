"""Online k-NN monitoring (``monitor.*``): the current backbone's k-NN on a labelled folder after an epoch,
with its floors (random init, raw pixels) measured once per run on the same split."""

from __future__ import annotations

from pathlib import Path

import torch

from swavkit.config import Config
from swavkit.data.constants import RAW_PIXELS_SOURCE, eval_size_px
from swavkit.data.folders import BUNDLED_SAMPLE
from swavkit.evaluation import knn
from swavkit.evaluation.features import load_eval_backbone


def monitor_folders(cfg: Config) -> tuple[Path, Path | None]:
    """``monitor.knn_data`` -> (train folder, val folder or None); "bundled" = the bundled sample."""
    return knn.monitor_folders(BUNDLED_SAMPLE if cfg.monitor.knn_data == "bundled" else cfg.monitor.knn_data)


def monitor_knn(backbone: torch.nn.Module, cfg: Config, device: torch.device) -> dict:
    """k-NN top-1/top-5 of the current backbone on the labelled ``monitor.knn_data``."""
    train_dir, val_dir = monitor_folders(cfg)
    result = knn.knn_monitor(backbone, train_dir, val_dir, image_size_px=cfg.monitor.image_size or eval_size_px(cfg.crops.sizes_px),
                         k=cfg.monitor.k, device=device, max_images=cfg.monitor.max_images, batch_size=256,
                         mean=cfg.crops.mean, std=cfg.crops.std)
    return {"knn_top1": result["top1"], "knn_top5": result.get("top5")}


def monitor_floors(cfg: Config, device: torch.device) -> dict:
    """The online k-NN's floors on the same split: the same architecture randomly initialised (the floor of
    swavkit.evaluation.features, fixed seed, the training RNG untouched) and raw pixels in [0, 1]."""
    train_dir, val_dir = monitor_folders(cfg)
    common = dict(image_size_px=cfg.monitor.image_size or eval_size_px(cfg.crops.sizes_px), k=cfg.monitor.k, device=device,
                  max_images=cfg.monitor.max_images, batch_size=256)
    random_init = load_eval_backbone(f"timm:{cfg.model.backbone}").to(device)
    pixels = load_eval_backbone(RAW_PIXELS_SOURCE)
    return {"knn_top1_random_init": knn.knn_monitor(random_init, train_dir, val_dir, mean=cfg.crops.mean,
                                                    std=cfg.crops.std, **common)["top1"],
            "knn_top1_raw_pixels": knn.knn_monitor(pixels, train_dir, val_dir, mean=(0.0, 0.0, 0.0),
                                                   std=(1.0, 1.0, 1.0), **common)["top1"]}
