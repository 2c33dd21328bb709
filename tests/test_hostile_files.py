"""Issue 17, items 4-7: hostile or odd files. Decoders other than swavkit's formats are never used, any
file name is written reversibly and printed safely, folders are walked once, and one pixel limit holds
for pretraining data, the start-up check and evaluation (the cluster explorer: tests/test_cluster.py)."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import swavkit.data.images as images_module
from bad_images import ODD_NAMES, EpsSpy, write_eps_as_jpg, write_just_over_limit_png
from conftest import tiny_overrides, write_images
from evaluation_fixtures import write_labelled_split
from swavkit.data import (MAX_IMAGE_PIXELS, DataError, LabelledImageFolder, UnlabeledImageFolder, UnreadableImage,
                          append_skipped_report, check_readable, eval_transform, find_images, path_from_printable,
                          printable_path, read_rgb, read_skipped_report)
from swavkit.evaluation.features import extract_features

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _skipped_by_training_dataset(folder: Path) -> dict[str, str]:
    """{path: reason} of every file the pretraining dataset skips over one pass."""
    dataset = UnlabeledImageFolder(folder)
    return {path: reason for i in range(len(dataset)) for path, reason in dataset[i][2]}


def _evaluation_error(class_folder_root: Path) -> str:
    """The DataError message of extracting features from a labelled folder holding one bad file."""
    data = LabelledImageFolder(class_folder_root, eval_transform(16, MEAN, STD, 1.0))
    with pytest.raises(DataError) as info:
        extract_features(torch.nn.Flatten(), data, "cpu", batch_size=4, num_workers=0, progress=False)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# item 4: only swavkit's formats are decoded

def test_postscript_in_a_jpg_never_reaches_the_eps_decoder(tmp_path, monkeypatch):
    spy = EpsSpy(monkeypatch)
    write_images(tmp_path / "flat", 3)
    eps = write_eps_as_jpg(tmp_path / "flat" / "vector.jpg")
    with pytest.raises(UnreadableImage, match="cannot identify image file"):
        read_rgb(eps)
    # pretraining: skipped and listed
    skipped = _skipped_by_training_dataset(tmp_path / "flat")
    assert list(skipped) == [str(eps)] and "UnidentifiedImageError" in skipped[str(eps)]
    # the start-up check passes over it
    assert check_readable([str(eps), *find_images(tmp_path / "flat")], tmp_path / "flat") == 1
    # evaluation: one line naming the file
    write_labelled_split(tmp_path / "labelled", 2, size_px=16)
    write_eps_as_jpg(tmp_path / "labelled" / "red" / "vector.jpg")
    assert "vector.jpg: unreadable image (UnidentifiedImageError" in _evaluation_error(tmp_path / "labelled")
    assert spy.calls == []


def test_supported_formats_are_still_read_whatever_the_extension(tmp_path):
    Image.new("RGB", (8, 6), (10, 200, 30)).save(tmp_path / "png_named.jpg", format="PNG")
    Image.new("RGB", (8, 6), (10, 200, 30)).save(tmp_path / "gif_named.tif", format="GIF")
    assert read_rgb(tmp_path / "png_named.jpg").size == read_rgb(tmp_path / "gif_named.tif").size == (8, 6)


# --------------------------------------------------------------------------------------------------
# item 5: any file name, written reversibly and printed safely

def _random_names(count: int, seed: int = 0) -> list[str]:
    """File names of random bytes (anything but "/" and NUL), weighted towards the troublesome ones."""
    rng = random.Random(seed)
    alphabet = [b for b in range(1, 256) if b != ord("/")]
    pieces = [b"\\", b"\\x41", b"\\u00e9", b"\t", b"\n", b"\r", b"\x1b[0m", "é".encode(), "猫".encode(),
              "\u202e".encode(), "\u2028".encode(), "\U0001F600".encode(), b"\xc3", b"\xed\xa0\x80"]
    names = []
    for _ in range(count):
        raw = b"".join(rng.choice(pieces) if rng.random() < 0.3 else bytes([rng.choice(alphabet)])
                       for _ in range(rng.randint(1, 24)))
        names.append(os.fsdecode(raw))
    return names


def test_printable_form_is_safe_and_reverses_exactly():
    for name in ODD_NAMES + _random_names(500):
        shown = printable_path(name)
        assert path_from_printable(shown) == name
        assert shown.isprintable()  # no control, format, separator or surrogate character
        shown.encode("utf-8")  # writable by a strict UTF-8 writer
    assert printable_path("plain/name é 猫.png") == "plain/name é 猫.png"  # ordinary names untouched
    assert printable_path(os.fsdecode(b"\xff\x1b[31m\t\\")) == "\\xff\\x1b[31m\\t\\\\"
    assert printable_path(b"\xff.png") == printable_path(os.fsdecode(b"\xff.png"))


def test_skipped_report_round_trips_any_name_and_survives_a_torn_line(tmp_path):
    report = tmp_path / "skipped.txt"
    reasons = ["OSError: cannot identify image file '\udcff\udcfe.png'", "tab\tand\nnewline", "\x1b[2J"]
    entries = [(f"/data/{name}", reasons[i % len(reasons)]) for i, name in enumerate(ODD_NAMES + _random_names(50))]
    assert append_skipped_report(report, entries[:20]) == 20
    assert append_skipped_report(report, []) == 0
    assert append_skipped_report(report, entries[20:]) == len(entries) - 20
    assert read_skipped_report(report) == entries
    lines = report.read_bytes().decode("utf-8").split("\n")  # strict UTF-8, one line per entry
    assert len(lines) == len(entries) + 1 and lines[-1] == "" and all(line.count("\t") == 1 for line in lines[:-1])
    # a crash in the middle of a write leaves a torn last line: the reader ignores it, the next append drops it
    report.write_bytes(report.read_bytes()[:-7])
    assert read_skipped_report(report) == entries[:-1]
    append_skipped_report(report, entries[:1])
    assert read_skipped_report(report) == entries[:-1] + entries[:1]


def _write_odd_folder(root: Path) -> tuple[set[str], set[str]]:
    """Readable and unreadable images under odd names; returns (readable, unreadable) paths as found."""
    root.mkdir(parents=True)
    write_images(root, 2)
    readable, unreadable = set(find_images(root)), set()
    for i, name in enumerate(ODD_NAMES):
        path = os.path.join(root, name)
        if i % 2:
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(path, format="PNG")
            readable.add(path)
        else:
            Path(path).write_bytes(b"not an image")
            unreadable.add(path)
    return readable, unreadable


def test_training_data_skips_odd_names_and_the_report_names_them_exactly(tmp_path):
    readable, unreadable = _write_odd_folder(tmp_path / "odd")
    assert set(find_images(tmp_path / "odd")) == readable | unreadable
    skipped = _skipped_by_training_dataset(tmp_path / "odd")
    assert set(skipped) == unreadable
    report = tmp_path / "skipped.txt"
    append_skipped_report(report, skipped.items())
    listed = dict(read_skipped_report(report))
    assert listed == skipped and all(os.path.exists(path) for path in listed)
    assert all(read_rgb(path).mode == "RGB" for path in readable)  # odd names open like any other


def test_messages_about_odd_names_are_one_printable_line(tmp_path):
    bad = tmp_path / "\x1b[31mred\nline.jpg"
    bad.write_bytes(b"junk")
    with pytest.raises(DataError) as info:
        check_readable([str(bad)], tmp_path)
    assert str(info.value).isprintable() and "\\x1b[31mred\\nline.jpg" in str(info.value)
    dataset = UnlabeledImageFolder(tmp_path, paths=[str(bad)], max_consecutive_failures=1)
    with pytest.raises(DataError) as info:
        dataset[0]
    assert str(info.value).isprintable()
    dataset.reading[0] = 0
    assert dataset.describe_reading() == [printable_path(bad)]


def test_training_run_lists_odd_names_in_skipped_txt(tmp_path):
    from swavkit.config import load_config
    from swavkit.training.trainer import train

    root = tmp_path / "odd"
    readable, unreadable = _write_odd_folder(root)
    write_images(root / "more", 14)
    out = tmp_path / "run"
    result = train(load_config([], tiny_overrides(root, out, **{"train.epochs": 1})), progress=False)
    assert result.completed
    assert {path for path, _ in read_skipped_report(out / "skipped.txt")} == unreadable


# --------------------------------------------------------------------------------------------------
# item 7: one pixel limit, bounded memory for 16-bit images

def test_an_image_just_over_the_limit_is_refused_alike_everywhere(tmp_path):
    # A real header just over swavkit's own limit (no monkeypatch): refused from the header, so the stub
    # pixel data is never decoded. Before, evaluation accepted it (Pillow only warns below 2x its limit).
    over = f"over swavkit's limit of {MAX_IMAGE_PIXELS:,} pixels"
    write_images(tmp_path / "flat", 2)
    huge = write_just_over_limit_png(tmp_path / "flat" / "huge.png", MAX_IMAGE_PIXELS)
    with pytest.raises(UnreadableImage, match=over):
        read_rgb(huge)
    assert over in _skipped_by_training_dataset(tmp_path / "flat")[str(huge)]
    with pytest.raises(DataError, match=over):
        check_readable([str(huge)], tmp_path / "flat")
    write_labelled_split(tmp_path / "labelled", 2, size_px=16)
    write_just_over_limit_png(tmp_path / "labelled" / "red" / "huge.png", MAX_IMAGE_PIXELS)
    assert over in _evaluation_error(tmp_path / "labelled")


def test_a_decodable_image_over_a_lowered_limit_is_refused(tmp_path, monkeypatch):
    # The limit lowered to 64 x 64 px so that a real, decodable image can sit one row over it.
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 64 * 64)
    Image.new("RGB", (64, 64)).save(tmp_path / "at_limit.png")
    Image.new("RGB", (64, 65)).save(tmp_path / "one_row_over.png")
    assert read_rgb(tmp_path / "at_limit.png").size == (64, 64)
    with pytest.raises(UnreadableImage, match="64 x 65 px = 4,160 pixels, over swavkit's limit of 4,096"):
        read_rgb(tmp_path / "one_row_over.png")
    assert list(_skipped_by_training_dataset(tmp_path)) == [str(tmp_path / "one_row_over.png")]


def _grey_round_trip(array: np.ndarray, path: Path) -> list:
    Image.fromarray(array).save(path)
    return np.asarray(read_rgb(path))[..., 0].tolist()


def test_sixteen_bit_scaling_is_exact(tmp_path):
    sixteen = np.array([[0, 256, 257, 32768, 65534, 65535]], dtype=np.uint16)
    assert _grey_round_trip(sixteen, tmp_path / "a.tif") == [[0, 0, 1, 127, 254, 255]]  # value * 255 // 65535
    eight_bit_in_int32 = np.array([[0, 7, 255]], dtype=np.int32)  # "I" with values <= 255: taken as 8-bit
    assert _grey_round_trip(eight_bit_in_int32, tmp_path / "b.tif") == [[0, 7, 255]]
    wide = np.array([[-5, 300, 65535, 70000]], dtype=np.int32)  # "I" beyond 16 bits: clipped to 0..65535
    assert _grey_round_trip(wide, tmp_path / "c.tif") == [[0, 1, 255, 255]]


def test_sixteen_bit_conversion_never_holds_a_float_copy(tmp_path):
    height, width = 2000, 3000
    ramp = (np.arange(height * width, dtype=np.uint64) % 65536).astype(np.uint16).reshape(height, width)
    Image.fromarray(ramp).save(tmp_path / "ramp16.tif")
    tracemalloc.start()
    try:
        image = read_rgb(tmp_path / "ramp16.tif")
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.size == (width, height) and image.getpixel((257, 0)) == (1, 1, 1)
    # A float64 copy alone is 8 bytes per pixel (the old conversion made two); the banded one needs the
    # 1-byte result plus one band.
    assert peak_bytes < 3 * height * width, f"{peak_bytes / (height * width):.1f} bytes per pixel"


# --------------------------------------------------------------------------------------------------
# issue 27, item 3: a multi-page TIFF is bounded in all its pages and samples, on every channel route

class WholeStackSpy:
    """Records every decode of a whole TIFF series (tifffile's TiffPageSeries.asarray)."""

    def __init__(self, monkeypatch):
        import tifffile

        self.shapes = []
        real = tifffile.TiffPageSeries.asarray

        def spy(series, *args, **kwargs):
            self.shapes.append(tuple(series.shape))
            return real(series, *args, **kwargs)

        monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", spy)


@pytest.mark.parametrize("channels, bit_depth", [(5, 16), (5, 8), (3, 16), (1, 16)])
def test_a_multi_page_tiff_is_bounded_in_all_its_pages_and_samples(tmp_path, monkeypatch, channels, bit_depth):
    import tifffile

    from swavkit.data.channels import read_channels

    # The limits lowered (64 x 64 px, 4 samples per pixel of it) so that a small real stack sits over them:
    # 5 pages of 64 x 64 = 20,480 samples, each page within the pixel limit - the shape of the 3.7 MB file
    # of 100 pages of 4096 x 4096 that decoded to 3.4 GB.
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 64 * 64)
    monkeypatch.setattr(images_module, "MAX_IMAGE_SAMPLES", 4 * 64 * 64)
    spy = WholeStackSpy(monkeypatch)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.full((5, 64, 64), 40000, dtype=np.uint16), photometric="minisblack")  # 5 pages
    if channels == 5:  # read whole: refused from the header, nothing decoded
        with pytest.raises(UnreadableImage, match="5 x 64 x 64 = 20,480 samples in all, over swavkit's limit of "
                                                  "16,384"):
            read_channels(stack, channels, bit_depth)
        assert spy.shapes == []
    elif channels == 3:  # converted as the RGB route does: its first page only, the stack never read whole
        assert read_channels(stack, channels, bit_depth).shape == (3, 64, 64) and spy.shapes == []
    else:  # another channel count: skipped from the header as before
        with pytest.raises(UnreadableImage, match="5 channel"):
            read_channels(stack, channels, bit_depth)
        assert spy.shapes == []
    at_limit = tmp_path / "four_pages.tif"  # 4 x 64 x 64 = 16,384 samples: read whole
    tifffile.imwrite(at_limit, np.full((4, 64, 64), 40000, dtype=np.uint16), photometric="minisblack")
    if channels not in (1, 3):
        assert read_channels(at_limit, 4, bit_depth).shape == (4, 64, 64) and spy.shapes == [(4, 64, 64)]
