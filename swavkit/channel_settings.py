"""``data.channels`` / ``data.bit_depth`` in a training run: the config checks, the backbone's ``in_chans``,
the per-channel mean/std (given, computed from a sample of the data, or taken back from the run being
resumed) and the multi-crop of the array route. The images themselves: swavkit.data.channels.
"""

from __future__ import annotations

from typing import Callable

from swavkit.config import Config, ConfigError
from swavkit.preprocessing import IMAGENET_MEAN, IMAGENET_STD


def mean_std_from_data(cfg: Config) -> bool:
    """True when crops.mean/std are to be computed from the data: both [] or, with data.channels != 3, still
    ImageNet's three RGB values (which cannot normalise another channel count)."""
    c = cfg.crops
    if not c.mean and not c.std:
        return True
    rgb_default = tuple(c.mean) == IMAGENET_MEAN and tuple(c.std) == IMAGENET_STD
    return cfg.data.channels != 3 and rgb_default


def check_channel_settings(cfg: Config) -> None:
    """ConfigError (one line naming the key) for settings the array route cannot take; records
    data.channels as ``model.backbone_kwargs.in_chans``, so every place that builds the backbone from a run's
    config (training, export, load_backbone, model.init checks) builds the same one."""
    d, c = cfg.data, cfg.crops
    if d.channels < 1:
        raise ConfigError(f"data.channels: must be >= 1, got {d.channels}")
    if d.bit_depth not in (8, 16):
        raise ConfigError(f"data.bit_depth: 8 or 16, got {d.bit_depth}")
    if d.mean_std_sample_images < 1:
        raise ConfigError(f"data.mean_std_sample_images: must be >= 1, got {d.mean_std_sample_images}")
    if bool(c.mean) != bool(c.std):
        raise ConfigError("crops.mean/crops.std: one is [] and the other is not; give both, or [] for both to "
                          "compute them from the data")
    if not mean_std_from_data(cfg) and not (len(c.mean) == len(c.std) == d.channels):
        raise ConfigError(f"crops.mean/crops.std: {len(c.mean)} and {len(c.std)} values for data.channels="
                          f"{d.channels}; give {d.channels} each, or [] to compute them from the data")
    in_chans = cfg.model.backbone_kwargs.get("in_chans", d.channels)
    if in_chans != d.channels:
        raise ConfigError(f"model.backbone_kwargs.in_chans={in_chans} differs from data.channels={d.channels}; "
                          "set data.channels only")
    if d.channels != 3:
        cfg.model.backbone_kwargs = {**cfg.model.backbone_kwargs, "in_chans": d.channels}
    if d.channels == 3 and d.bit_depth == 8:
        return
    if d.decode_on_device == "true":
        raise ConfigError(f"data.decode_on_device=true: decodes 8-bit RGB JPEGs only; with data.channels="
                          f"{d.channels} data.bit_depth={d.bit_depth} set it to false")
    if d.channels != 3 and cfg.monitor.knn_data:
        raise ConfigError(f"monitor.knn_data: the online k-NN reads RGB images; with data.channels={d.channels} "
                          "leave it empty and evaluate the export (swavkit.features.extract_features)")


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
    from swavkit.data.channels import ChannelReader, estimate_mean_std

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
    from swavkit.data.channels import ChannelCropTransform

    d, c = cfg.data, cfg.crops
    if d.channels != 3 and ((c.color_jitter_strength > 0 and c.color_jitter_probability > 0)
                            or c.grayscale_probability > 0):
        say(f"crops: colour jitter and grayscale are off: they are RGB operations and data.channels={d.channels} "
            "(crop, flip, blur and normalisation stay)")
    return ChannelCropTransform.from_config(c)  # C = len(crops.mean): jitter and grayscale off unless 3


def refuse_rgb_only(preprocessing, source, what: str) -> None:
    """ConfigError (one line) when ``source``'s backbone takes other than 8-bit RGB and ``what`` (a command whose
    augmentation is RGB-only: swavkit finetune, the reference linear probe) cannot feed it yet."""
    if (preprocessing.channels, preprocessing.bit_depth) != (3, 8):
        raise ConfigError(f"{source}: the backbone takes {preprocessing.channels} channel(s) at "
                          f"{preprocessing.bit_depth} bits; {what} augments 8-bit RGB images only (not yet): use "
                          "swavkit knn or the fast linear probe, which read images as the export says")


__all__ = ["mean_std_from_data", "check_channel_settings", "adopt_saved_mean_std", "resolve_mean_std", "channel_crops",
           "refuse_rgb_only"]
