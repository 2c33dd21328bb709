"""``data.channels`` / ``data.bit_depth`` in a training run: the per-channel mean/std (given, computed from a
sample of the data, or taken back from the run being resumed) and the multi-crop of the array route. The
config's checks are in swavkit/config.py (``check_channel_settings``); the images in swavkit/data/channels.py.
"""

from __future__ import annotations

from typing import Callable

from swavkit.config import Config, mean_std_from_data
from swavkit.data.channels import ChannelCropTransform, ChannelReader, estimate_mean_std


def adopt_saved_mean_std(cfg: Config, saved: dict) -> None:
    """On resume: when ``cfg`` asks for mean/std from the data, take the numbers the run computed (saved in
    its checkpoint's config) instead of computing them again - the weights were trained with those."""
    crops = saved.get("crops", {})
    if mean_std_from_data(cfg) and crops.get("mean") and len(crops["mean"]) == cfg.data.channels:
        cfg.crops.mean, cfg.crops.std = list(crops["mean"]), list(crops["std"])


def resolve_mean_std(cfg: Config, paths, say: Callable[[str], None], is_main: bool, broadcast: Callable) -> None:
    """When asked (:func:`mean_std_from_data`), crops.mean/std computed from ``paths`` on the main process
    (``broadcast`` gives every process the same numbers) and written into ``cfg``, so config.yaml, the
    checkpoint and the export record them. Any route: with 3 channels the pixels are those read_rgb gives."""
    d, c = cfg.data, cfg.crops
    if not mean_std_from_data(cfg):
        return
    reader = ChannelReader(d.channels, d.bit_depth)
    mean, std, used = estimate_mean_std(paths, reader, d.mean_std_sample_images) if is_main else (None, None, 0)
    mean, std, used = broadcast((mean, std, used))
    c.mean, c.std = mean, std
    say(f"data: per-channel mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]} from {used} "
        f"images (data.mean_std_sample_images={d.mean_std_sample_images}); recorded in config.yaml and the export")


def channel_crops(cfg: Config, say: Callable[[str], None]):
    """The array route's multi-crop transform (after :func:`resolve_mean_std`), with a printed reason when
    the RGB-only augmentations are switched off."""
    d, c = cfg.data, cfg.crops
    if d.channels != 3 and ((c.color_jitter_strength > 0 and c.color_jitter_probability > 0)
                            or c.grayscale_probability > 0):
        say(f"crops: colour jitter and grayscale are off: they are RGB operations and data.channels={d.channels} "
            "(crop, flip, blur and normalisation stay)")
    return ChannelCropTransform.from_config(c)  # C = len(crops.mean): jitter and grayscale off unless 3


__all__ = ["adopt_saved_mean_std", "resolve_mean_std", "channel_crops"]
