"""Images that are not 8-bit RGB: ``data.channels`` (1 for grey/medical, N for multispectral TIFF stacks) and
``data.bit_depth`` (16 keeps 16-bit images at 16 bits of precision into the float tensor).

The 8-bit RGB route (``data.channels=3, data.bit_depth=8``, the defaults) never comes here: every file is
converted to RGB by :func:`swavkit.data.images.read_rgb` and cut by PIL. Every other setting takes the
"array" route of this module:

* :class:`ChannelReader` decodes a file to an array [C, H, W] of uint8 or uint16. TIFFs (found by their
  magic bytes, not their extension) are read with ``tifffile``, the field's reader for multispectral stacks:
  Pillow cannot open a 16-bit TIFF with more than one sample per pixel. A TIFF's channels are its one
  non-spatial axis: samples per pixel (``YXS``) or pages (``IYX``/``CYX``/``QYX``). Other formats go
  through Pillow (:func:`swavkit.data.images.open_image`: same formats, same pixel limit); their channels
  are the bands Pillow reports (L, I;16: 1; RGB: 3; RGBA, CMYK: 4, alpha kept as a band), palettes
  expanded first.
* The channel rule: an image whose channel count is not ``data.channels`` is skipped (listed in
  ``skipped.txt`` with its count) - except with ``data.channels=3``, where, as on the RGB route, a grey
  image is replicated and any other image is converted to RGB by ``read_rgb``. The count comes from the
  header, before any pixel is decoded.
* :class:`ChannelCropTransform` is the multi-crop of :class:`swavkit.multicrop.MultiCropTransform` (the same
  random draws from the same per-sample seed) on arrays: crops as float32 [C, s, s] in [0, 1] (value / 255 or
  / 65535: a float32 holds every one of the 65536 levels, bf16/fp16 would not). Colour jitter and
  grayscale are RGB operations, so they are off when ``data.channels != 3`` (the run prints why).
* :class:`ArrayEvalTransform`: the evaluation transform (resize, centre crop, normalise) on arrays.
* :func:`estimate_mean_std`: per-channel mean/std of a sample of the images, for ``crops.mean: []`` (and
  for ``data.channels != 3`` left at ImageNet's three values, which cannot apply); the run records the
  numbers in config.yaml, the checkpoint and the export's config.json.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageOps

from swavkit.data import images
from swavkit.errors import DataError
from swavkit.data.images import (GREY16_BAND_PIXELS, GREY16_MODES, UnreadableImage, describe_failure, open_image,
                                 read_rgb)
from swavkit.data.multicrop import MultiCropTransform

BIT_DEPTHS = (8, 16)
# Little- and big-endian TIFF, classic and BigTIFF.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# The largest value of each stored sample type: the float tensor is value / this.
FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


# ----------------------------------------------------------------------------------------------------
# decoding: file -> [C, H, W] uint8 | uint16

class ChannelCountMismatch(ValueError):
    """An image with another number of channels than data.channels (raised from its header)."""


def _is_tiff(path: str | os.PathLike) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) in TIFF_MAGIC


def _check_channels(found: int, wanted: int) -> None:
    # With 3 channels, images of any count are converted to RGB (the RGB route's rule), so none is refused.
    if found != wanted and wanted != 3:
        raise ChannelCountMismatch(f"{found} channel(s), but data.channels={wanted}; convert it or set "
                                   f"data.channels={found}")


def _tiff_array(path: str | os.PathLike, channels: int) -> np.ndarray | None:
    """A TIFF's first series as [C, H, W]; the channel count, the page size and the total number of samples
    checked from the header. None when ``channels`` is 3 and the TIFF holds neither 1 nor 3 channels: the
    caller converts its first page with read_rgb (the RGB route's rule) instead."""
    import tifffile  # only TIFF users pay its import

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        if "Y" not in axes or "X" not in axes:
            raise ValueError(f"TIFF axes {axes}: no image plane")
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        limit = images.MAX_IMAGE_PIXELS  # looked up here: the one limit of every command (images.py)
        if height * width > limit:
            raise ValueError(f"{width} x {height} px = {width * height:,} pixels, over swavkit's limit of "
                             f"{limit:,} pixels")
        extra = [(axis, size) for axis, size in zip(axes, shape) if axis not in "YX" and size > 1]
        if len(extra) > 1:
            raise ValueError(f"TIFF axes {axes} {tuple(shape)}: more than one non-spatial axis; swavkit reads one "
                             "channel axis (samples or pages)")
        if np.dtype(series.dtype).newbyteorder("=") not in FULL_SCALE:  # big-endian ("MM") files included
            raise ValueError(f"TIFF samples of type {series.dtype}: swavkit reads 8- and 16-bit unsigned integers")
        count = extra[0][1] if extra else 1
        _check_channels(count, channels)
        if channels == 3 and count not in (1, 3):
            return None  # converted by read_rgb, which decodes one page: the stack is never read whole
        # all pages and samples are decoded at once: bounded from the header, before any of them is
        images.check_samples(math.prod(shape), f"TIFF {axes} {' x '.join(map(str, shape))}")
        pixels = series.asarray()
    pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)  # native byte order for torch
    kept = [i for i, (axis, size) in enumerate(zip(axes, shape)) if axis in "YX" or size > 1]
    pixels = pixels.reshape([shape[i] for i in kept])
    kept_axes = "".join(axes[i] for i in kept)
    if len(kept_axes) == 2:
        return pixels.transpose(kept_axes.index("Y"), kept_axes.index("X"))[None]
    channel_axis = next(i for i, axis in enumerate(kept_axes) if axis not in "YX")
    return pixels.transpose(channel_axis, kept_axes.index("Y"), kept_axes.index("X"))


def _pil_array(path: str | os.PathLike, channels: int) -> np.ndarray:
    """Any other format through Pillow (swavkit's formats and pixel limit) as [C, H, W]."""
    with open_image(path) as image:
        image.seek(0)  # the first frame of an animation
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in ("1", "F"):
            image = image.convert("L")
        elif image.mode not in GREY16_MODES + ("L", "LA", "RGB", "RGBA", "CMYK"):
            image = image.convert("RGB")  # YCbCr, LAB, HSV
        _check_channels(len(image.getbands()), channels)
        image = ImageOps.exif_transpose(image)
        pixels = np.asarray(image)
    if image.mode in GREY16_MODES:
        # "I" holds 32-bit integers: 16-bit data when any value is over 255 (read_rgb's rule), else 8-bit
        sixteen_bit = image.mode.startswith("I;16") or int(pixels.max(initial=0)) > 255
        pixels = np.clip(pixels, 0, 65535 if sixteen_bit else 255).astype(np.uint16 if sixteen_bit else np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def header_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) in px from the header only: TIFFs through tifffile (Pillow cannot open every stack),
    other files through open_image. Raises what the reader raises for a file it cannot identify."""
    if _is_tiff(path):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            axes, shape = tif.series[0].axes, tif.series[0].shape
            return shape[axes.index("X")], shape[axes.index("Y")]
    with open_image(path) as image:
        return image.size


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """uint16 [C, H, W] -> uint8 (value * 255 // 65535, read_rgb's scaling), a band of rows at a time so the
    transient copy stays small (GREY16_BAND_PIXELS)."""
    out = np.empty(pixels.shape, dtype=np.uint8)
    rows = max(1, GREY16_BAND_PIXELS // max(1, pixels.shape[2]))
    for top in range(0, pixels.shape[1], rows):
        out[:, top:top + rows] = pixels[:, top:top + rows].astype(np.uint32) * 255 // 65535
    return out


def read_channels(path: str | os.PathLike, channels: int, bit_depth: int = 8) -> np.ndarray:
    """Decode ``path`` to [channels, H, W]: uint8, or with ``bit_depth=16`` uint16 for 16-bit sources (8-bit
    sources stay uint8; the float tensor is value / 255 or / 65535 either way).

    Raises UnreadableImage (naming the file and the reason) for a file that cannot be decoded, is over the
    pixel limit, or has another channel count than ``channels`` (see the module's channel rule).
    """
    try:
        pixels = _tiff_array(path, channels) if _is_tiff(path) else _pil_array(path, channels)
        if pixels is None or (channels == 3 and pixels.shape[0] not in (1, 3)):
            pixels = np.asarray(read_rgb(path)).transpose(2, 0, 1)  # alpha, CMYK, stacks ...: read_rgb's conversions
        elif channels == 3 and pixels.shape[0] == 1:
            pixels = np.repeat(pixels, 3, axis=0)  # grey in an RGB set, as read_rgb does
    except UnreadableImage:
        raise
    except Exception as err:  # decoders raise OSError, ValueError, struct.error, tifffile's own errors ...
        raise UnreadableImage(path, describe_failure(err)) from err
    return to_8bit(pixels) if bit_depth == 8 and pixels.dtype == np.uint16 else pixels


@dataclass(frozen=True)
class ChannelReader:
    """``read_channels`` with fixed settings, picklable for DataLoader workers: path -> [C, H, W] array."""
    channels: int
    bit_depth: int = 8

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        return read_channels(path, self.channels, self.bit_depth)


def as_float(pixels: np.ndarray) -> torch.Tensor:
    """[C, h, w] uint8/uint16 array (a view is fine) -> float32 tensor in [0, 1]."""
    return torch.from_numpy(pixels.astype(np.float32)).div_(FULL_SCALE[pixels.dtype])


# ----------------------------------------------------------------------------------------------------
# transforms

class ChannelCropTransform(MultiCropTransform):
    """[C, H, W] array -> list of V (float32 crop [C, s_v, s_v] in [0, 1], colour parameters [N_PARAMS]).

    The crop boxes, flips and blur come from ``MultiCropTransform.geometry`` (the same single draw per
    image); the crops are cut from the array and resized with antialiased bilinear interpolation (as PIL's
    resize on the RGB route). ``collate`` / ``collate_pixels`` / ``finish`` are MultiCropTransform's.
    The channel count is that of ``mean``/``std``: unless it is 3, colour jitter and grayscale (RGB
    operations) are off whatever their probabilities say.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mean.shape[1] != 3:  # one home for the rule: every way of building the transform obeys it
            self.jitter_probability = self.grayscale_probability = 0.0

    def __call__(self, pixels: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        _, height, width = pixels.shape
        crops = []
        for size, (box, flip, params) in zip(self.sizes_px, self.geometry(width, height)):
            left, top, right, bottom = box
            region = as_float(pixels[:, top:bottom, left:right])
            crop = F.interpolate(region[None], size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=True)[0].clamp_(0, 1)
            crops.append((crop.flip(-1) if flip else crop, params))
        return crops


class ArrayEvalTransform:
    """[C, H, W] array -> [C, size_px, size_px] float32: resize the short side to size_px / crop_fraction
    (antialiased bilinear), centre-crop size_px, normalise with mean/std ([C] each) - the RGB route's
    swavkit.data.transforms.eval_transform on arrays."""

    def __init__(self, size_px: int, mean, std, crop_fraction: float):
        self.size_px, self.resize_px = int(size_px), int(math.floor(size_px / crop_fraction))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        if pixels.shape[0] != len(self.mean):
            raise ValueError(f"{pixels.shape[0]} channel(s) for a backbone of {len(self.mean)}")
        x = as_float(pixels)
        height, width = x.shape[-2:]
        # torchvision's Resize(int): the short side to resize_px, the long side int(resize_px * long / short)
        long_px = int(self.resize_px * max(height, width) / min(height, width))
        size = (self.resize_px, long_px) if height <= width else (long_px, self.resize_px)
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp_(0, 1)
        top, left = (size[0] - self.size_px) // 2, (size[1] - self.size_px) // 2
        return (x[:, top:top + self.size_px, left:left + self.size_px] - self.mean) / self.std


# ----------------------------------------------------------------------------------------------------
# per-channel statistics of the data

def estimate_mean_std(paths, reader: ChannelReader, n_images: int) -> tuple[list[float], list[float], int]:
    """Per-channel mean and std (over all pixels of an evenly spaced sample of ``n_images`` readable images,
    in the float tensor's [0, 1] units) -> (mean [C], std [C], images used). Unreadable or mismatched files
    are passed over, as training skips them; DataError when the sample holds none."""
    step = max(1, len(paths) // max(1, n_images))
    sums = squares = None
    count, used = 0, 0
    for path in paths[::step][:n_images]:
        try:
            pixels = reader(path)
        except UnreadableImage:
            continue
        scale = FULL_SCALE[pixels.dtype]
        if sums is None:
            sums, squares = np.zeros(pixels.shape[0]), np.zeros(pixels.shape[0])
        rows = max(1, GREY16_BAND_PIXELS // max(1, pixels.shape[2]))
        for top in range(0, pixels.shape[1], rows):  # float64 a band at a time, not of the whole image
            band = pixels[:, top:top + rows].astype(np.float64) / scale
            sums += band.sum(axis=(1, 2))
            squares += np.square(band).sum(axis=(1, 2))
        count += pixels.shape[1] * pixels.shape[2]
        used += 1
    if not used:
        raise DataError(f"crops.mean/crops.std: none of the {min(len(paths), n_images)} sampled images has "
                        f"{reader.channels} channel(s) and decodes; check data.channels")
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    # A constant channel (std 0) would divide by zero; 1 leaves it centred and unscaled.
    return [float(m) for m in mean], [float(s) if s > 1e-6 else 1.0 for s in std], used


__all__ = ["BIT_DEPTHS", "read_channels", "header_size", "ChannelReader", "ChannelCountMismatch", "to_8bit",
           "as_float", "ChannelCropTransform", "ArrayEvalTransform", "estimate_mean_std"]
