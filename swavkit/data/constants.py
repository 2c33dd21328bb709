"""The numbers every image path shares: normalisation statistics, the default image size and the one
evaluation crop rule. Stdlib only, so ``swavkit.config`` takes its defaults from here without torch."""

from __future__ import annotations

# ImageNet RGB statistics: the defaults of config.crops and of every evaluation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE_PX = 224
# The usual centre crop: resize the short side to size / 0.875, keep the central size x size.
CENTRE_CROP_FRACTION = 0.875
# At CIFAR-like sizes that crop throws away an eighth of an already tiny image, so these are resized whole.
FULL_IMAGE_MAX_SIZE_PX = 64
# Backbone source that stands for "no network": flattened pixels, the floor every result must beat.
RAW_PIXELS_SOURCE = "pixels"
# 224 px would give 150,528-dimensional "features"; compare at the size of the backbone you test
RAW_PIXELS_DEFAULT_SIZE_PX = 32


def crop_fraction_for(image_size_px: int) -> float:
    """The evaluation crop rule: 1.0 (whole image) up to FULL_IMAGE_MAX_SIZE_PX, else CENTRE_CROP_FRACTION.

    Every evaluation (k-NN, linear probe, online monitor, cluster explorer) and the ``crop_pct`` of an
    export follow it.
    """
    return 1.0 if image_size_px <= FULL_IMAGE_MAX_SIZE_PX else CENTRE_CROP_FRACTION


def is_rgb8(channels: int, bit_depth: int) -> bool:
    """Whether images of ``channels`` channels at ``bit_depth`` bits are 8-bit RGB: the default route (PIL RGB
    images, colour augmentation, JPEG decoding on the device, thumbnails, floors). Anything else is read as
    arrays by :mod:`swavkit.data.channels`; the one rule every layer asks."""
    return channels == 3 and bit_depth == 8


def eval_size_px(crop_sizes_px) -> int:
    """The image side a backbone is evaluated and exported at: its largest training crop (``crops.sizes_px[0]``,
    the groups being listed largest first). Every evaluation of a run, its export's ``input_size`` and the
    online monitor follow it."""
    return int(crop_sizes_px[0])


__all__ = ["eval_size_px", "is_rgb8", "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_IMAGE_SIZE_PX", "CENTRE_CROP_FRACTION", "FULL_IMAGE_MAX_SIZE_PX",
           "RAW_PIXELS_SOURCE", "RAW_PIXELS_DEFAULT_SIZE_PX", "crop_fraction_for"]
