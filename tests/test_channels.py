"""data.channels / data.bit_depth: N-channel and 16-bit images from file to features, end to end
(pretrain -> export -> load_backbone -> extract_features -> embed) on generated 1- and 4-channel TIFF folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import timm
import torch
from PIL import Image

from conftest import tiny_overrides
from swavkit.config import ConfigError, load_config
from swavkit.data import LabelledImageFolder, UnreadableImage, read_rgb, read_skipped_report
from swavkit.data import images as images_module
from swavkit.data.channels import (ArrayEvalTransform, ChannelCropTransform, ChannelReader, estimate_mean_std,
                                   read_channels)
from swavkit.errors import DataError
from swavkit.evaluation.features import extract_features
from swavkit.evaluation.knn import evaluate_knn
from swavkit.data.multicrop import P_GRAY, P_JITTER, MultiCropTransform
from swavkit.artifacts.preprocessing import resolve_preprocessing
from swavkit.artifacts.pretrained import load_backbone
from swavkit.training.trainer import train


def write_stack(path, pixels: np.ndarray, layout: str = "samples") -> None:
    """[C, H, W] -> a TIFF: C samples per pixel (YXS, the usual multispectral layout) or C pages."""
    if pixels.shape[0] == 1:
        tifffile.imwrite(path, pixels[0])
    elif layout == "samples":
        tifffile.imwrite(path, pixels.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig")
    else:
        tifffile.imwrite(path, pixels, photometric="minisblack")


def write_tiff_folder(root, channels: int, n: int = 16, size_px: int = 24) -> list[np.ndarray]:
    """Two class folders of 16-bit (12-bit range, like CT/multispectral sensors) C-channel TIFFs; the class
    decides which channel is bright. Returns the arrays written."""
    rng = np.random.default_rng(channels)
    written = []
    for i in range(n):
        pixels = rng.integers(0, 3000, (channels, size_px, size_px)).astype(np.uint16)
        pixels[(i % 2) % channels] += 1000
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        write_stack(folder / f"im{i:02d}.tif", pixels, layout="samples" if i % 4 else "pages")
        written.append(pixels)
    return written


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 4])
def test_pretrain_export_load_embed_on_n_channel_16bit_tiffs(tmp_path, channels):
    data = tmp_path / "data"
    written = write_tiff_folder(data, channels)
    Image.new("RGB", (24, 24), (9, 9, 9)).save(data / "class0" / "photo.png")  # 3 channels: skipped, reported
    overrides = tiny_overrides(data, tmp_path / "run", **{"data.channels": channels, "data.bit_depth": 16,
                                                          "train.loggers": "[jsonl]", "train.epochs": 1,
                                                          "optim.warmup_epochs": 0})
    if channels == 4:  # once is enough: a resume takes the mean/std it computed instead of refusing a "changed" config
        stopped = train(load_config([], overrides), progress=False, stop_after_steps=1)
        assert not stopped.completed
    result = train(load_config([], overrides), progress=False)
    assert result.completed

    config = json.loads((result.backbone_dir / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [channels, 32, 32] and config["input_bit_depth"] == 16
    assert config["model_args"]["in_chans"] == channels
    # fewer images than data.mean_std_sample_images: the statistics are those of the whole folder
    every = np.stack(written).astype(np.float64) / 65535
    np.testing.assert_allclose(cfg["mean"], every.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(cfg["std"], every.std(axis=(0, 2, 3)), rtol=1e-5)
    skipped = read_skipped_report(tmp_path / "run" / "skipped.txt")
    assert {path for path, _ in skipped} == {str(data / "class0" / "photo.png")}
    assert f"3 channel(s), but data.channels={channels}" in skipped[0][1]

    net = load_backbone(result.backbone_dir)
    assert timm.create_model(f"local-dir:{result.backbone_dir}", pretrained=True).pretrained_cfg["mean"] == cfg["mean"]
    (data / "class0" / "photo.png").unlink()  # evaluation stops on a file it cannot read, by design
    preprocessing = resolve_preprocessing(result.backbone_dir)
    assert (preprocessing.channels, preprocessing.bit_depth) == (channels, 16)
    dataset = LabelledImageFolder(data, preprocessing.transform(), reader=preprocessing.reader())
    image, _ = dataset[0]
    assert image.shape == (channels, 32, 32)
    features, labels = extract_features(net, dataset, num_workers=0, progress=False)
    assert features.shape == (len(written), net.num_features) and torch.isfinite(features).all()
    assert labels.tolist() == dataset.labels
    # swavkit knn reads the export the same way; its RGB floors are skipped with a reason, not a crash
    result = evaluate_knn(result.backbone_dir, data, data, num_workers=0, progress=False, k=3,
                          out_json=str(tmp_path / "knn.json"))
    assert result["preprocessing"]["channels"] == channels and result["preprocessing"]["bit_depth"] == 16
    assert "floors skipped" in result["floors_skipped"] and "floors" not in result
    # swavkit embed on the same folder: one unit row per image, the same features as extract_features
    from swavkit import embed
    from swavkit.embeddings.neighbours import neighbours

    embedded = embed(tmp_path / "run" / "backbone", data, tmp_path / "emb.npy", num_workers=0, device="cpu",
                     progress=False)
    rows = np.load(embedded.vectors)
    assert rows.shape == (len(written), net.num_features)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    expected = torch.nn.functional.normalize(features, dim=1).numpy()
    paths = embedded.paths.read_text().splitlines()
    order = [sorted(paths).index(path) for path in paths]  # the folder order of both readers
    np.testing.assert_allclose(rows, expected[order], atol=1e-5)
    # a query of another channel count is refused in one line, nothing written
    Image.new("RGB", (24, 24), (9, 9, 9)).save(tmp_path / "rgb_query.png")
    with pytest.raises(DataError, match=f"3 channel\\(s\\), but data.channels={channels}"):
        neighbours(embedded.manifest, tmp_path / "nb", queries=[str(tmp_path / "rgb_query.png")], progress=False)
    assert not (tmp_path / "nb").exists()


def test_sixteen_bits_keep_every_level_and_eight_bits_scale_like_read_rgb(tmp_path):
    levels = np.arange(1000, 1000 + 64, dtype=np.uint16).reshape(1, 8, 8)  # 64 neighbouring 16-bit levels
    write_stack(tmp_path / "grey.tif", levels)
    Image.fromarray(levels[0]).save(tmp_path / "grey16.png")  # Pillow's I;16 route
    for name in ("grey.tif", "grey16.png"):
        kept = read_channels(tmp_path / name, 1, bit_depth=16)
        assert kept.dtype == np.uint16 and np.array_equal(kept, levels)
        eight = read_channels(tmp_path / name, 1, bit_depth=8)
        assert np.array_equal(eight, levels.astype(np.uint32) * 255 // 65535)
    rgb = np.asarray(read_rgb(tmp_path / "grey16.png"))
    assert np.array_equal(read_channels(tmp_path / "grey16.png", 1, 8)[0], rgb[..., 0])
    # one crop of the whole image at its own size: every level reaches the float tensor, value / 65535
    transform = ChannelCropTransform([2], [8], [1.0], [1.0])
    crop = transform(read_channels(tmp_path / "grey.tif", 1, 16))[0][0]
    assert torch.allclose(crop.flatten().sort().values, torch.from_numpy(levels.ravel() / 65535.0).float(), atol=1e-7)
    assert crop.flatten().unique().numel() == 64


def test_channel_rule_layouts_and_mismatches(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65535, (4, 6, 5)).astype(np.uint16)
    write_stack(tmp_path / "samples.tif", pixels, "samples")
    write_stack(tmp_path / "pages.tif", pixels, "pages")
    tifffile.imwrite(tmp_path / "big_endian.tif", pixels.transpose(1, 2, 0), byteorder=">", photometric="minisblack",
                     planarconfig="contig")
    for name in ("samples.tif", "pages.tif", "big_endian.tif"):
        assert np.array_equal(read_channels(tmp_path / name, 4, 16), pixels)
    with pytest.raises(UnreadableImage, match=r"pages\.tif.*4 channel\(s\), but data.channels=1"):
        read_channels(tmp_path / "pages.tif", 1, 16)
    Image.new("RGB", (5, 6)).save(tmp_path / "rgb.png")
    with pytest.raises(UnreadableImage, match=r"rgb\.png.*3 channel\(s\), but data.channels=1"):
        read_channels(tmp_path / "rgb.png", 1)
    # with 3 channels, as on the RGB route: grey replicated, RGBA composited on white by read_rgb
    Image.fromarray(np.full((6, 5), 77, np.uint8)).save(tmp_path / "grey.png")
    assert np.array_equal(read_channels(tmp_path / "grey.png", 3), np.full((3, 6, 5), 77, np.uint8))
    Image.new("RGBA", (5, 6), (10, 20, 30, 0)).save(tmp_path / "clear.png")
    assert (read_channels(tmp_path / "clear.png", 3) == 255).all()
    assert read_channels(tmp_path / "clear.png", 4)[3].max() == 0  # 4 channels: alpha is a band, kept
    tifffile.imwrite(tmp_path / "float.tif", pixels.astype(np.float32).transpose(1, 2, 0), photometric="minisblack")
    with pytest.raises(UnreadableImage, match="float32"):
        read_channels(tmp_path / "float.tif", 4)


def test_typical_side_reads_stacks_pillow_cannot_open(tmp_path):
    from swavkit.training.presets import typical_side_px

    for i in range(3):
        write_stack(tmp_path / f"{i}.tif", np.zeros((4, 40 + i, 50), np.uint16))  # 16-bit, 4 samples: not Pillow's
    assert typical_side_px(sorted(str(p) for p in tmp_path.glob("*.tif"))) == 41


def test_tiff_over_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 64 * 64)
    write_stack(tmp_path / "ok.tif", np.zeros((4, 64, 64), np.uint16))
    write_stack(tmp_path / "over.tif", np.zeros((4, 65, 64), np.uint16))
    assert read_channels(tmp_path / "ok.tif", 4, 16).shape == (4, 64, 64)
    with pytest.raises(UnreadableImage, match="over swavkit's limit of 4,096"):
        read_channels(tmp_path / "over.tif", 4, 16)


def test_array_route_cuts_the_rgb_routes_crops_and_evaluates_alike(tmp_path):
    """With 3 channels and 8 bits forced through the array route, the same seed gives the same boxes,
    flips and colour parameters as the PIL route, and pixels within a few levels (two resamplers)."""
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (3, 8, 10)), np.ones((1, 6, 6))).astype(np.uint8)  # [3, 48, 60]
    kwargs = dict(counts=[2, 2], sizes_px=[32, 16], min_scales=[0.3, 0.1], max_scales=[1.0, 0.3])
    pil, array = MultiCropTransform(**kwargs), ChannelCropTransform(**kwargs)
    torch.manual_seed(3)
    want = pil(Image.fromarray(smooth.transpose(1, 2, 0)))
    torch.manual_seed(3)
    got = array(smooth)
    for (crop_a, params_a), (crop_b, params_b) in zip(want, got):
        assert torch.equal(params_a, params_b)
        assert (crop_a.float() / 255 - crop_b).abs().mean() < 3 / 255
    # evaluation: ArrayEvalTransform against the RGB eval transform, same size and normalisation
    preprocessing = resolve_preprocessing("timm:resnet10t", image_size_px=40)
    want = preprocessing.transform()(Image.fromarray(smooth.transpose(1, 2, 0)))
    got = ArrayEvalTransform(40, preprocessing.mean, preprocessing.std, preprocessing.crop_fraction)(smooth)
    assert got.shape == want.shape == (3, 40, 40) and (got - want).abs().mean() < 0.05


def test_array_crops_collate_and_normalise_per_channel(tmp_path):
    """The batched half (in the workers, or finish() on the training device with data.colour_on_device) takes
    the float crops as they are (no / 255) and normalises each of the C channels with its own mean/std."""
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.125, 1.0]
    transform = ChannelCropTransform([1, 1], [8, 4], [0.5, 0.2], [1.0, 0.5], blur_probability=0.0, mean=mean, std=std)
    pixels = np.random.default_rng(0).integers(0, 65535, (3, 4, 12, 10)).astype(np.uint16)
    items = [(transform(p), i, []) for i, p in enumerate(pixels)]
    views, indices, _ = transform.collate(items)
    assert [tuple(v.shape) for v in views] == [(3, 4, 8, 8), (3, 4, 4, 4)] and indices.tolist() == [0, 1, 2]
    raw = torch.stack([crops[0][0] for crops, _, _ in items])  # [3, 4, 8, 8] in [0, 1]
    want = (raw - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    assert torch.allclose(views[0], want, atol=1e-6)
    groups, _, _ = transform.collate_pixels(items)
    assert all(torch.equal(a, b) for a, b in zip(transform.finish(groups), views))


def test_colour_jitter_and_grayscale_are_off_for_other_channel_counts():
    cfg = load_config([], ["data.channels=4", "crops.color_jitter_probability=1", "crops.grayscale_probability=1",
                           "crops.mean=[0.5,0.5,0.5,0.5]", "crops.std=[0.2,0.2,0.2,0.2]"])
    transform = ChannelCropTransform.from_config(cfg.crops)
    params = torch.stack([transform.colour_parameters(u) for u in torch.rand(200, 35).tolist()])
    assert not params[:, P_JITTER].any() and not params[:, P_GRAY].any()
    rgb = ChannelCropTransform([2], [8], [0.5], [1.0], color_jitter_probability=1, grayscale_probability=1)
    assert rgb.colour_parameters([0.0] * 35)[P_JITTER] == 1  # unchanged with 3 channels
    assert rgb.colour_parameters([0.0] * 35)[P_GRAY] == 1


def test_empty_mean_std_are_computed_for_rgb_too(tmp_path):
    from swavkit.training.channels import resolve_mean_std

    rgb = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    for i, image in enumerate(rgb):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    cfg = load_config([], ["model.backbone=resnet10t", "crops.mean=[]", "crops.std=[]"])
    said = []
    resolve_mean_std(cfg, sorted(str(p) for p in tmp_path.glob("*.png")), said.append, True, lambda value: value)
    np.testing.assert_allclose(cfg.crops.mean, rgb.mean(axis=(0, 1, 2)) / 255, rtol=1e-9)
    np.testing.assert_allclose(cfg.crops.std, (rgb / 255).std(axis=(0, 1, 2)), rtol=1e-6)
    assert "from 2 images" in said[0]
    untouched = load_config([], ["model.backbone=resnet10t"])
    resolve_mean_std(untouched, [], said.append, True, lambda value: value)
    assert untouched.crops.mean == [0.485, 0.456, 0.406] and len(said) == 1  # ImageNet's, as given


def test_mean_std_of_a_sample_matches_numpy(tmp_path):
    written = write_tiff_folder(tmp_path, 4, n=8)
    paths = sorted(str(p) for p in tmp_path.rglob("*.tif"))
    mean, std, used = estimate_mean_std(paths, ChannelReader(4, 16), n_images=4)
    sample = [np.asarray(read_channels(p, 4, 16), np.float64) / 65535 for p in paths[::2][:4]]
    assert used == 4
    np.testing.assert_allclose(mean, np.stack(sample).mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(std, np.stack(sample).std(axis=(0, 2, 3)), rtol=1e-6)
    assert len(written) == 8


@pytest.mark.parametrize("override,message", [
    (["data.channels=1", "crops.mean=[0.5,0.5,0.5]", "crops.std=[0.2,0.2,0.2]"],
     "crops.mean/crops.std: 3 and 3 values"),
    (["data.channels=1", "crops.mean=[]"], "crops.mean/crops.std: one is"),
    (["data.channels=4", "data.decode_on_device=true"], "data.decode_on_device=true"),
    (["data.bit_depth=12"], "data.bit_depth: 8 or 16"),
    (["data.channels=0"], "data.channels: must be >= 1"),
    (["data.channels=4", "model.backbone_kwargs={in_chans: 3}"], "model.backbone_kwargs.in_chans=3"),
    (["data.channels=4", "monitor.knn_data=bundled"], "monitor.knn_data"),
])
def test_channel_settings_are_checked_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        load_config([], ["model.backbone=resnet10t", *override])
    assert "\n" not in str(err.value)


def test_rgb_only_commands_refuse_other_inputs_in_one_line():
    from swavkit.data.transforms import Preprocessing

    Preprocessing.for_size(32).require_rgb("runs/rgb", "swavkit finetune")  # 8-bit RGB: nothing to say
    for preprocessing in (Preprocessing.for_size(32, [0.5] * 4, [0.2] * 4), Preprocessing.for_size(32, bit_depth=16)):
        with pytest.raises(ConfigError, match="runs/x: the backbone takes .* swavkit finetune augments 8-bit RGB"):
            preprocessing.require_rgb("runs/x", "swavkit finetune")


def test_channels_reach_the_backbone_as_in_chans():
    cfg = load_config([], ["model.backbone=resnet10t", "data.channels=4"])
    assert cfg.model.backbone_kwargs == {"in_chans": 4}
    assert load_config([], ["model.backbone=resnet10t"]).model.backbone_kwargs == {}
