"""Builders for the broken and unusual image files real folders contain."""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from swavkit.data import MAX_IMAGE_PIXELS


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a stub): enough to trip the
    decompression-bomb guard without allocating gigabytes in the test."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def make_bad_folder(root: Path) -> tuple[set[str], set[str]]:
    """Write unusual-but-readable and unreadable files under ``root``; return (readable, unreadable) names."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    readable, unreadable = set(), set()

    def keep(name):
        readable.add(name)
        return root / name

    # readable but unusual
    rgb(40, 30).convert("CMYK").save(keep("cmyk.jpg"))
    Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)).save(keep("sixteen_bit.png"))
    palette = rgb(24, 24).convert("P")
    palette.info["transparency"] = 0
    palette.save(keep("palette_alpha.png"), transparency=0)
    frames = [rgb(20, 20) for _ in range(3)]
    frames[0].save(keep("animated.gif"), save_all=True, append_images=frames[1:])
    frames[0].save(keep("animated.webp"), save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rgb(40, 20).save(keep("exif_rotated.jpg"), exif=exif)
    rgb(1, 1).save(keep("one_pixel.png"))
    rgb(30, 30).save(keep("really_a_png.jpg"), format="PNG")  # wrong extension
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), "RGBA").save(keep("alpha.png"))
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), "L").save(keep("grey.bmp"))
    rgb(30, 30).save(keep("photo.tif"))

    # unreadable
    buffer = io.BytesIO()
    rgb(64, 64).save(buffer, format="JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image\n")
    (root / "page.jpg").write_text("<html><body>404 not found</body></html>")
    (root / "huge.png").write_bytes(_png_with_size(20000, 20000))  # over 2x: Pillow itself refuses it
    write_just_over_limit_png(root / "just_over.png", MAX_IMAGE_PIXELS)  # only swavkit's own check refuses it
    write_eps_as_jpg(root / "vector.jpg")
    unreadable |= {"truncated.jpg", "empty.png", "notes.jpg", "page.jpg", "huge.png", "just_over.png", "vector.jpg"}
    if os.geteuid() == 0:  # root reads mode-000 files anyway: a dangling link is what root cannot open
        os.symlink(root / "gone.png", root / "dangling.png")
        unreadable.add("dangling.png")
    else:
        locked = root / "locked.png"
        rgb(10, 10).save(locked)
        locked.chmod(0)
        unreadable.add("locked.png")

    # a symlink loop: sub/loop -> root
    (root / "sub").mkdir()
    rgb(16, 16).save(root / "sub" / "inside.png")
    readable.add("sub/inside.png")
    os.symlink(root, root / "sub" / "loop")
    return readable, unreadable


# --------------------------------------------------------------------------------------------------
# hostile files (issue 17 items 4, 5, 7)

# PostScript in a .jpg: Pillow would identify it as EPS and hand it to Ghostscript on load.
EPS_TEXT = ("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
            "newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")

# File names a scraped folder can hold: bytes that are not UTF-8, a tab, a newline, a terminal escape
# sequence (would turn the terminal red), a right-to-left override (reverses the rest of a line).
ODD_NAMES = [os.fsdecode(b"\xff\xfe.png"), "tab\there.png", "new\nline.png", "\x1b[31mred.png",
             "rtl\u202egnp.png"]


def write_eps_as_jpg(path: Path) -> Path:
    path.write_text(EPS_TEXT)
    return path


def write_just_over_limit_png(path: Path, limit_pixels: int) -> Path:
    """A PNG whose header claims a square of side isqrt(limit) + 1 (1.0002x the limit at Pillow's default),
    pixel data a stub: refused from the header, or it fails to decode for another reason."""
    side = math.isqrt(limit_pixels) + 1
    path.write_bytes(_png_with_size(side, side))
    return path


class EpsSpy:
    """Records every use of Pillow's EPS decoder (identification or Ghostscript) in this process."""

    def __init__(self, monkeypatch):
        from PIL import EpsImagePlugin

        self.calls: list[str] = []
        real_open = EpsImagePlugin.EpsImageFile._open

        def spy_open(image):
            self.calls.append("EpsImageFile._open")
            return real_open(image)

        def spy_ghostscript(*args, **kwargs):
            self.calls.append("Ghostscript")
            raise OSError("Ghostscript called (test spy)")

        monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy_open)
        monkeypatch.setattr(EpsImagePlugin, "Ghostscript", spy_ghostscript)
