"""Decoding one image file: which formats swavkit opens, how large an image may be, and the conversion of
every mode (grey, palette, alpha, CMYK, 16-bit) to 8-bit RGB.

Every command (pretraining, evaluation, the cluster explorer, the start-up readability check) opens
images through :func:`open_image` / :func:`read_rgb`, so they all accept and refuse the same files:

* formats: only the decoders of the formats in FORMAT_OF_EXTENSION, whatever the file's extension says
  (a PNG named ``.jpg`` is still read). A ``.jpg`` holding PostScript is refused instead of reaching
  Pillow's EPS decoder, which hands the file to Ghostscript where that is installed.
* size: an image of more than MAX_IMAGE_PIXELS pixels is refused from its header, before any pixel is
  decoded; and whatever one decode produces, all pages and samples per pixel together, is at most
  MAX_IMAGE_SAMPLES samples (Pillow decodes one frame of at most 4 bands; a TIFF stack read whole by
  swavkit.data.channels is checked against it from its header).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from swavkit.errors import DataError
from swavkit.data.names import printable_path

# The image files swavkit reads, and the Pillow decoder of each. JPEG covers MPO too (multi-picture JPEGs
# from phones): Pillow's JPEG opener returns those.
FORMAT_OF_EXTENSION = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP",
                       ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF"}
IMAGE_EXTENSIONS = tuple(FORMAT_OF_EXTENSION)
IMAGE_FORMATS = tuple(sorted(set(FORMAT_OF_EXTENSION.values())))
# Pillow's default decompression-bomb threshold (0.25 GiB of 24-bit pixels, about 9459 x 9459). Pillow
# only warns between 1x and 2x of it; swavkit refuses everything above 1x, in every command.
MAX_IMAGE_PIXELS = 89_478_485
# Everything one decode may produce, all pages and samples per pixel together: what Pillow decodes for an RGBA
# or CMYK image at the pixel limit (0.33 GiB at 8 bits, 0.67 GiB at 16). A 100-page stack of 4096 x 4096 px
# (1.7 billion samples, 3.4 GB at 16 bits from a 4 MB file) is refused from its header.
MAX_IMAGE_SAMPLES = 4 * MAX_IMAGE_PIXELS
# 16-bit images are scaled to 8 bits this many pixels at a time: the transient memory is ~20 bytes per
# pixel of one band (5 MB), where one float64 copy of the whole image would be 0.7 GB at the limit.
GREY16_BAND_PIXELS = 1 << 18
GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# A truncated JPEG would otherwise decode with a grey bottom; we prefer to detect and skip it ourselves.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UnreadableImage(DataError):
    """An image file that cannot be decoded, or that swavkit refuses to decode.

    ``path`` is the name as the file system gave it; ``reason`` is one line in the decoder's words
    ("UnidentifiedImageError: cannot identify image file ..."). The message is printable (see names.py).
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = os.fsdecode(path), reason
        super().__init__(f"{printable_path(self.path)}: unreadable image ({printable_path(reason)})")

    def __reduce__(self):  # picklable across DataLoader workers despite the two-argument constructor
        return type(self), (self.path, self.reason)


class ImageTooLarge(ValueError):
    """More pixels than MAX_IMAGE_PIXELS (raised by open_image; read_rgb reports it as UnreadableImage)."""


def describe_failure(err: BaseException) -> str:
    """One line naming the error type and the first line of its message, at most 200 characters."""
    first_line = str(err).splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first_line}"[:200] if first_line else type(err).__name__


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` lazily (header read, no pixels decoded) with swavkit's formats and pixel limit.

    Use it as a context manager. Raises ImageTooLarge above MAX_IMAGE_PIXELS, and whatever Pillow raises
    for a file it cannot identify (``PIL.UnidentifiedImageError`` for any other format).
    """
    limit = f"swavkit's limit of {MAX_IMAGE_PIXELS:,} pixels"
    with warnings.catch_warnings():
        # Pillow warns from 1x its limit; we refuse those ourselves below, with the image's size.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as err:  # over 2x Pillow's limit: Pillow refuses first
            raise ImageTooLarge(f"over {limit} ({str(err).split(',')[0]})") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise ImageTooLarge(f"{width} x {height} px = {width * height:,} pixels, over {limit}")
    return image


def check_samples(samples: int, described: str) -> None:
    """ImageTooLarge when a decode would produce more than MAX_IMAGE_SAMPLES samples (``described``: the
    header's shape, for the message)."""
    if samples > MAX_IMAGE_SAMPLES:
        raise ImageTooLarge(f"{described} = {samples:,} samples in all, over swavkit's limit of "
                            f"{MAX_IMAGE_SAMPLES:,} (4 per pixel of its {MAX_IMAGE_PIXELS:,}-pixel limit)")


def _grey16_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey ("I;16*") or 32-bit integer grey ("I") -> 8-bit "L".

    Pillow's own convert clips at 255 (a 16-bit image comes out almost white), so 0..65535 is scaled to
    0..255 here (value * 255 // 65535, in integers); an "I" image whose values all fit 0..255 is taken as
    8-bit. Done a band of rows at a time, so the transient memory stays bounded (GREY16_BAND_PIXELS).
    """
    width, height = image.size
    sixteen_bit = image.mode.startswith("I;16") or image.getextrema()[1] > 255
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, GREY16_BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        band = np.asarray(image.crop((0, top, width, min(height, top + rows))))
        band = np.clip(band, 0, 65535 if sixteen_bit else 255).astype(np.uint32)
        out[top:top + rows] = band * 255 // 65535 if sixteen_bit else band
    return Image.fromarray(out)


def _decode_rgb(path: str | os.PathLike) -> Image.Image:
    with open_image(path) as image:
        image.seek(0)  # the first frame of an animation
        image = ImageOps.exif_transpose(image)
        if image.mode in GREY16_MODES:
            image = _grey16_to_8bit(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):  # composite on white, not on black
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        image = image.convert("RGB")
        image.load()
        return image


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to an RGB PIL image (EXIF orientation applied, first frame of animations).

    Handles grayscale, palette (with transparency), alpha (composited on white), CMYK and 16-bit
    images. Raises UnreadableImage (naming the file and the decoder's reason) for any file it cannot or
    will not decode: another format, a truncated or empty file, more than MAX_IMAGE_PIXELS pixels.
    """
    try:
        return _decode_rgb(path)
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, struct.error ...
        raise UnreadableImage(path, describe_failure(err)) from err


def check_readable(paths: list[str], root: str | os.PathLike, reader=None) -> int:
    """Index of the first decodable image; DataError naming the folder when none is (a folder of only
    broken files would otherwise fail deep inside a data-loading worker). ``reader``: the decoder training
    uses (None: read_rgb; swavkit.data.channels.ChannelReader for data.channels / data.bit_depth)."""
    first_error = None
    for index, path in enumerate(paths):
        try:
            (reader or read_rgb)(path)
            return index
        except UnreadableImage as err:
            first_error = first_error or err
    raise DataError(f"data.path: none of the {len(paths)} image files under {printable_path(root)} can be "
                    f"decoded (first: {first_error})")


def read_rgb_bytes(data: bytes, name: str) -> Image.Image:
    """:func:`read_rgb` for an image held in memory (a tar shard's member); UnreadableImage names it ``name``."""
    try:
        return _decode_rgb(io.BytesIO(data))
    except Exception as err:  # the same decoders, the same failures as for a file
        raise UnreadableImage(name, describe_failure(err)) from err
