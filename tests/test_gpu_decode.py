"""data.decode_on_device (swavkit.data.device_decode): JPEGs decoded and cut in the training process.

On a CPU the route runs torchvision's decode_jpeg (libjpeg-turbo) where the PIL route runs Pillow's
decoder; both then resize the same boxes bilinearly with antialiasing (torch's uint8 kernel vs Pillow's).
Measured on 500 x 375 px JPEGs (smooth random colour, noise, a white edge; Pillow quality 90): the full
decodes are identical here, the crops differ by at most 4 levels (of 255) and 0.01-0.02 levels on average
(resampling rounding near sharp edges). Asserted with margin: max <= 8 levels, mean <= 0.1 levels.
Geometry, flips and colour parameters must be identical (the same seeded draw).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from swavkit.config import load_config
from swavkit.data import read_skipped_report
from swavkit.data.datasets import UnlabeledImageFolder, seeded_transform
from swavkit.data.device_decode import (EncodedCrops, EncodedJpeg, collate_encoded, decode_and_crop, decode_batch,
                                        encoded_or_rgb, read_encoded)
from swavkit.data.images import read_rgb_bytes
from swavkit.data.multicrop import MultiCropTransform
from swavkit.training.trainer import train

MAX_LEVELS, MEAN_LEVELS = 8, 0.1  # tolerance of the crops against the PIL route (measured: 4, 0.02)
PAPER = MultiCropTransform([2, 6], [224, 96], [0.14, 0.05], [1.0, 0.14])


def smooth_jpeg(seed: int, width: int = 500, height: int = 375, mode: str = "RGB", quality: int = 90) -> bytes:
    """An ImageNet-sized JPEG: a smooth random colour field, noise and one sharp white edge."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
    pixels[:, width // 3:width // 3 + 4] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def corrupt(data: bytes) -> bytes:
    """The same JPEG with marker bytes written over its coded data: the header reads, decoding fails
    (in Pillow and in decode_jpeg alike)."""
    return data[:2000] + b"\xff\xc4" * 100 + data[2200:]


def pil_route(datas: list[bytes], seeds: list[int], transform=PAPER):
    items = [(seeded_transform(transform, read_rgb_bytes(d, f"img{i}"), s), i, [])
             for i, (d, s) in enumerate(zip(datas, seeds))]
    return transform.collate_pixels(items)[0]


def device_route(datas: list[bytes], seeds: list[int], transform=PAPER):
    items = [(seeded_transform(EncodedCrops(transform), encoded_or_rgb(d, f"img{i}"), s), i, [])
             for i, (d, s) in enumerate(zip(datas, seeds))]
    batch, indices, skipped = collate_encoded(items)
    assert indices.tolist() == list(range(len(datas))) and skipped == []
    return decode_batch(batch, transform.sizes_px, "cpu")


def assert_close_crops(groups_pil, groups_device):
    assert len(groups_pil) == len(groups_device)
    for (pixels_a, params_a, n_a), (pixels_b, params_b, n_b) in zip(groups_pil, groups_device):
        assert pixels_a.shape == pixels_b.shape and pixels_b.dtype == torch.uint8 and n_a == n_b
        assert torch.equal(params_a, params_b)  # the same seeded draw: identical colour ops
        diff = (pixels_a.int() - pixels_b.int()).abs()
        assert diff.max() <= MAX_LEVELS, diff.max()
        assert diff.float().mean() <= MEAN_LEVELS, diff.float().mean()


def test_device_route_gives_the_pil_routes_crops_within_a_few_levels():
    """Paper crops (2x224 + 6x96) of real-size JPEGs: same geometry and colour parameters, pixels within
    the stated tolerance; a different seed gives different crops (the comparison can fail)."""
    datas = [smooth_jpeg(i) for i in range(4)] + [smooth_jpeg(9, mode="L")]  # a grey JPEG too
    seeds = [1000 + i for i in range(len(datas))]
    groups_device, unreadable = device_route(datas, seeds)
    assert unreadable == []
    assert_close_crops(pil_route(datas, seeds), groups_device)
    other = pil_route(datas, [7 + s for s in seeds])
    assert (other[0][0].int() - groups_device[0][0].int()).abs().float().mean() > 10  # not a vacuous check
    # the finished views too (colour ops on both, ImageNet normalisation: 1 level ~ 0.017)
    views_pil, views_device = PAPER.finish(pil_route(datas, seeds)), PAPER.finish(groups_device)
    worst = max(float((a - b).abs().max()) for a, b in zip(views_pil, views_device))
    assert worst <= MAX_LEVELS / 255 / 0.22, worst


def test_other_files_are_cut_in_the_worker_and_spliced_in_batch_order():
    """A PNG, a CMYK JPEG and an EXIF-rotated JPEG take the PIL route in the worker; the batch keeps its
    order and those rows are exactly the PIL route's crops."""
    png = io.BytesIO()
    Image.open(io.BytesIO(smooth_jpeg(3))).save(png, "PNG")
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(smooth_jpeg(4))).convert("CMYK").save(cmyk, "JPEG", quality=90)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(io.BytesIO(smooth_jpeg(5))).save(rotated, "JPEG", quality=90, exif=exif)
    datas = [smooth_jpeg(0), png.getvalue(), cmyk.getvalue(), smooth_jpeg(1), rotated.getvalue()]
    assert [isinstance(encoded_or_rgb(d, "x"), EncodedJpeg) for d in datas] == [True, False, False, True, False]
    seeds = [5, 6, 7, 8, 9]
    groups_device, unreadable = device_route(datas, seeds)
    groups_pil = pil_route(datas, seeds)
    assert unreadable == []
    assert_close_crops(groups_pil, groups_device)
    for (pixels_a, _, n), (pixels_b, _, _) in zip(groups_pil, groups_device):
        for view in range(n):  # rows 1, 2, 4 of every view were cut by PIL in the worker: identical
            for row in (1, 2, 4):
                assert torch.equal(pixels_a[view * 5 + row], pixels_b[view * 5 + row])


def test_undecodable_jpeg_is_listed_and_replaced_by_the_next_image_of_the_batch():
    """A JPEG whose header reads but whose data does not decode fails the batched call; the images are
    then decoded one by one, the bad one is reported and its rows take the next image's crops."""
    datas = [smooth_jpeg(0), corrupt(smooth_jpeg(1)), smooth_jpeg(2)]
    assert isinstance(encoded_or_rgb(datas[1], "bad"), EncodedJpeg)  # passes the worker's header check
    items = [(seeded_transform(EncodedCrops(PAPER), encoded_or_rgb(d, f"img{i}.jpg"), 50 + i), i, [])
             for i, d in enumerate(datas)]
    batch, _, _ = collate_encoded(items)
    groups, unreadable = decode_batch(batch, PAPER.sizes_px, "cpu")
    assert [name for name, _ in unreadable] == ["img1.jpg"] and "Huffman" in unreadable[0][1]
    for pixels, params, n in groups:
        for view in range(n):
            assert torch.equal(pixels[view * 3 + 1], pixels[view * 3 + 2])  # row 1 = row 2's crops
            assert torch.equal(params[view * 3 + 1], params[view * 3 + 2])
            assert not torch.equal(pixels[view * 3 + 0], pixels[view * 3 + 2])
    # decode_and_crop itself: the failed row is zeros, the reason names the decoder's complaint
    jpegs = [batch.data[int(a):int(b)] for a, b in zip(batch.offsets[:-1], batch.offsets[1:])]
    views, reasons = decode_and_crop(jpegs, batch.boxes, batch.flips, PAPER.sizes_px, "cpu")
    assert [bool(r) for r in reasons] == [False, True, False] and views[0][1].sum() == 0 and views[0][0].sum() > 0


def test_worker_side_refuses_what_every_command_refuses(tmp_path):
    """A truncated JPEG (nvJPEG would decode it with a grey bottom) and a non-image are skipped in the
    worker, replaced by the next readable file, as on the PIL route."""
    (tmp_path / "a_cut.jpg").write_bytes(smooth_jpeg(0)[:20000])
    (tmp_path / "b_text.jpg").write_bytes(b"not an image")
    (tmp_path / "c_good.jpg").write_bytes(smooth_jpeg(1))
    dataset = UnlabeledImageFolder(tmp_path, EncodedCrops(PAPER), reader=read_encoded)
    sample, index, skipped = dataset[(0, 123)]
    assert [p.rsplit("/", 1)[-1] for p, _ in skipped] == ["a_cut.jpg", "b_text.jpg"]
    assert sample.jpeg is not None and sample.jpeg.name.endswith("c_good.jpg") and (sample.jpeg.width, sample.jpeg.height) == (500, 375)


def test_pixel_limit_is_checked_from_the_header(monkeypatch):
    """The route refuses an image over swavkit's pixel limit before keeping its bytes, as read_rgb does."""
    import swavkit.data.images as images

    data = smooth_jpeg(0)
    assert isinstance(encoded_or_rgb(data, "big.jpg"), EncodedJpeg)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 500 * 375 - 1)
    with pytest.raises(images.UnreadableImage, match="big.jpg.*over swavkit's limit"):
        encoded_or_rgb(data, "big.jpg")


def _sample_folder(root, n: int = 16):
    root.mkdir()
    for i in range(n):
        (root / f"img{i:02d}.jpg").write_bytes(smooth_jpeg(i, width=96, height=72))
    Image.open(io.BytesIO(smooth_jpeg(99, width=96, height=72))).save(root / "img99.png")
    return root


def files_of(run_dir) -> set[str]:
    """The files of a run folder (the TensorBoard event file by its folder: its name holds a time stamp)."""
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    return {"tensorboard/*" if name.startswith("tensorboard/") else name for name in names}


def test_training_with_decode_on_device_completes_and_writes_the_same_files(tmp_path):
    """A few steps of resnet10t at 32 px crops with data.decode_on_device=true (one undecodable JPEG in
    the folder): the run completes, writes the files the PIL route writes and lists the bad file."""
    folder = _sample_folder(tmp_path / "images")
    (folder / "img07.jpg").write_bytes(corrupt(smooth_jpeg(7, width=96, height=72)))
    extra = {"train.epochs": 1, "train.device": "cpu", "crops.blur_probability": 0.5}
    pil = train(load_config([], tiny_overrides(folder, tmp_path / "pil", **extra)))
    device = train(load_config([], tiny_overrides(folder, tmp_path / "dev", **extra, **{"data.decode_on_device": "true"})))
    assert pil.completed and device.completed and device.step == pil.step == 2
    written = files_of(tmp_path / "pil")
    assert files_of(tmp_path / "dev") == written
    assert {"config.yaml", "metrics.jsonl", "checkpoints/last.pt", "skipped.txt"} <= written
    for run in ("pil", "dev"):
        assert [p.rsplit("/", 1)[-1] for p, _ in read_skipped_report(tmp_path / run / "skipped.txt")] == ["img07.jpg"]
    rows = [json.loads(line) for line in (tmp_path / "dev" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    assert "decode_on_device: 'true'" in (tmp_path / "dev" / "config.yaml").read_text()


@pytest.mark.parametrize("value", ["auto", "false"])
def test_decode_on_device_is_off_unless_asked(value, tmp_path):
    from swavkit.data.device_decode import resolve_decode_on_device
    assert resolve_decode_on_device(value, torch.device("cpu")) is False
    assert resolve_decode_on_device("true", torch.device("cpu")) is True


def test_shards_train_with_decode_on_device(tmp_path):
    """Tar shards written by `swavkit shard` keep the JPEG bytes; with data.decode_on_device=true the
    workers pass them on encoded and the run completes with finite losses."""
    from swavkit.data.shard_writer import write_shards

    folder = _sample_folder(tmp_path / "images")
    write_shards(str(folder), tmp_path / "shards", 6, progress=False)
    result = train(load_config([], tiny_overrides(tmp_path / "shards" / "shard-*.tar", tmp_path / "run",
                                                  **{"train.epochs": 1, "data.decode_on_device": "true"})))
    assert result.completed and result.step == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
