"""Multi-crop augmentation: torchvision-equal colour maths, torchvision's crop geometry, and crops that
depend on (seed, epoch, index) only - never on the batch, the worker or the process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from swavkit.data import UnlabeledImageFolder, sample_seed
from swavkit.data.multicrop import (N_PARAMS, MultiCropTransform, adjust_brightness, adjust_contrast,
                               adjust_hue, adjust_saturation, blur_kernel_px, crop_box, gaussian_blur, grayscale)
from conftest import write_images

TORCHVISION_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _images(n=6, size=20, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = x[0, :1]  # a grey image: hue and saturation have special cases there
    return x


@pytest.mark.parametrize("ours,theirs,low,high", [
    (adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
    (adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
    (adjust_saturation, TF.adjust_saturation, 0.2, 1.8),
    (adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_each_colour_op_equals_torchvision_per_image(ours, theirs, low, high):
    x = _images()
    factors = torch.linspace(low, high, len(x))
    got = ours(x.clone(), factors.view(-1, 1, 1, 1))
    want = torch.stack([theirs(img, float(f)) for img, f in zip(x, factors)])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_grayscale_and_blur_equal_torchvision():
    x = _images()
    assert torch.allclose(grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6)
    sigmas = torch.linspace(0.1, 2.0, len(x))
    kernel = blur_kernel_px(64)
    got = gaussian_blur(x, sigmas, kernel)
    want = torch.stack([TF.gaussian_blur(img, [kernel, kernel], [float(s), float(s)]) for img, s in zip(x, sigmas)])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_batched_colour_equals_torchvision_sequence_per_crop():
    """The whole colour half, on a batch with random parameters, equals torchvision's functional ops applied
    crop by crop in each crop's own op order, then grayscale, blur and normalisation."""
    transform = MultiCropTransform([1], [20], [0.5], [1.0], color_jitter_strength=1.0, color_jitter_probability=0.8,
                                   grayscale_probability=0.3, blur_probability=0.5)
    torch.manual_seed(1)
    n = 64
    params = torch.stack([transform.colour_parameters(u) for u in torch.rand(n, 35).tolist()])
    x = _images(n)
    got = transform.colour(x.clone(), params)
    want = []
    for img, p in zip(x, params):
        if p[0] > 0:
            for op in p[5:9].long().tolist():
                img = TORCHVISION_JITTER[op](img, float(p[1 + op]))
        if p[9] > 0:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p[10] > 0:
            img = TF.gaussian_blur(img, [blur_kernel_px(20)] * 2, [float(p[11])] * 2)
        want.append(TF.normalize(img, list(transform.mean.flatten()), list(transform.std.flatten())))
    want = torch.stack(want)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # every branch was exercised
    assert 0 < int((params[:, 0] > 0).sum()) < n and 0 < int((params[:, 9] > 0).sum()) < n
    assert 0 < int((params[:, 10] > 0).sum()) < n
    assert len({tuple(o) for o in params[params[:, 0] > 0, 5:9].long().tolist()}) > 5  # op orders vary


def test_parameter_distribution_matches_the_recipe():
    transform = MultiCropTransform([1], [8], [0.5], [1.0], color_jitter_strength=0.5, color_jitter_probability=0.8,
                                   grayscale_probability=0.2, blur_probability=0.5)
    torch.manual_seed(0)
    p = torch.stack([transform.colour_parameters(u) for u in torch.rand(20000, 35).tolist()])
    assert p.shape[1] == N_PARAMS
    assert abs(float((p[:, 0] > 0).float().mean()) - 0.8) < 0.02
    assert abs(float((p[:, 9] > 0).float().mean()) - 0.2) < 0.02
    assert abs(float((p[:, 10] > 0).float().mean()) - 0.5) < 0.02
    jittered = p[p[:, 0] > 0]
    for column in (1, 2, 3):  # brightness/contrast/saturation in [1 - 0.4, 1 + 0.4]
        assert 0.6 <= float(jittered[:, column].min()) and float(jittered[:, column].max()) <= 1.4
        assert abs(float(jittered[:, column].mean()) - 1.0) < 0.02
    assert -0.1 <= float(jittered[:, 4].min()) and float(jittered[:, 4].max()) <= 0.1
    assert sorted(jittered[0, 5:9].long().tolist()) == [0, 1, 2, 3]
    blurred = p[p[:, 10] > 0, 11]
    assert 0.1 <= float(blurred.min()) and float(blurred.max()) <= 2.0
    off = MultiCropTransform([1], [8], [0.5], [1.0], color_jitter_strength=0.0, grayscale_probability=0.0,
                             blur_probability=0.0)
    assert all(float(off.colour_parameters(u).abs().sum()) == 0 for u in torch.rand(100, 35).tolist())


def test_crop_box_follows_random_resized_crop_geometry():
    torch.manual_seed(0)
    width, height = 40, 30
    areas, ratios = [], []
    for u in torch.rand(5000, 35).tolist():
        left, top, right, bottom = crop_box(width, height, (0.2, 0.6), u)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        areas.append(w * h / (width * height))
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    # rounding to whole pixels widens the range slightly
    assert areas.min() > 0.2 * 0.85 and areas.max() < 0.6 * 1.15
    assert ratios.min() > 0.75 * 0.85 and ratios.max() < 4 / 3 * 1.15
    # the position is uniform: crops touch every border
    tries = [0.5, 0.5] * 10
    assert crop_box(width, height, (0.2, 0.2), tries + [0.0, 0.0] + [0.0] * 13)[:2] == (0, 0)
    assert crop_box(width, height, (0.2, 0.2), tries + [0.999, 0.999] + [0.0] * 13)[2:] == (width, height)
    # impossible tries fall back to torchvision's central crop
    u = [1.0, 1.0] * 10 + [0.5] * 15
    assert crop_box(100, 20, (1.0, 1.0), u) == (math.floor((100 - 27) / 2), 0, math.floor((100 - 27) / 2) + 27, 20)


def test_crops_shapes_and_plain_normalisation():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    transform = MultiCropTransform([2, 3], [16, 8], [1.0, 0.2], [1.0, 0.4], color_jitter_strength=0.0,
                                   grayscale_probability=0.0, blur_probability=0.0, mean=(0.5, 0.5, 0.5),
                                   std=(0.25, 0.25, 0.25))
    torch.manual_seed(0)
    crops = transform(image)
    assert [c.shape for c, _ in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    assert all(c.dtype == torch.uint8 for c, _ in crops)
    views, indices, skipped = transform.collate([(crops, 7, [])])
    assert [v.shape for v in views] == [(1, 3, 16, 16)] * 2 + [(1, 3, 8, 8)] * 3
    assert indices.tolist() == [7] and skipped == []
    # no colour ops: the view is exactly the normalised crop; scale 1.0 is the whole image, maybe flipped
    expected = (crops[0][0].float() / 255 - 0.5) / 0.25
    assert torch.allclose(views[0][0], expected, atol=1e-6)
    whole = TF.pil_to_tensor(image.resize((16, 16), Image.BILINEAR))
    assert torch.equal(crops[0][0], whole) or torch.equal(crops[0][0], whole.flip(-1))


def test_views_depend_on_the_sample_seed_only(tmp_path):
    """Same (seed, epoch, index) -> same views, whichever batch the sample is collated in; another epoch ->
    other views."""
    write_images(tmp_path, 6, size_px=28)
    transform = MultiCropTransform([2, 2], [16, 8], [0.4, 0.1], [1.0, 0.4], color_jitter_strength=1.0,
                                   blur_probability=0.5)
    data = UnlabeledImageFolder(tmp_path, transform)
    keys = [(i, sample_seed(3, 1, i)) for i in range(6)]
    together, indices, _ = transform.collate([data[k] for k in keys])
    alone = [transform.collate([data[k]])[0] for k in reversed(keys)][::-1]
    assert indices.tolist() == list(range(6))
    for v, view in enumerate(together):
        assert torch.allclose(view, torch.cat([a[v] for a in alone]), atol=1e-6)
    other_epoch, _, _ = transform.collate([data[(i, sample_seed(3, 2, i))] for i in range(6)])
    assert not torch.allclose(together[0], other_epoch[0])
    # the training process's global RNG stream is left alone
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    data[keys[0]]
    assert torch.equal(torch.rand(3), before)


def test_colour_on_device_route_gives_the_workers_views(tmp_path):
    """data.colour_on_device: workers send uint8 crops + parameters (a quarter of the bytes), the training
    process finishes them; on the same device that is the same arithmetic, so the views are identical."""
    write_images(tmp_path, 5, size_px=28)
    transform = MultiCropTransform([2, 3], [16, 8], [0.4, 0.1], [1.0, 0.4], blur_probability=0.5)
    data = UnlabeledImageFolder(tmp_path, transform)
    items = [data[(i, sample_seed(0, 0, i))] for i in range(5)]
    views, indices, _ = transform.collate(items)
    groups, indices_too, _ = transform.collate_pixels(items)
    assert [(g[0].dtype, tuple(g[0].shape), g[2]) for g in groups] == [(torch.uint8, (10, 3, 16, 16), 2),
                                                                       (torch.uint8, (15, 3, 8, 8), 3)]
    assert torch.equal(indices, indices_too)
    finished = transform.finish(groups, "cpu")
    assert len(finished) == 5
    for ours, theirs in zip(finished, views):
        assert torch.equal(ours, theirs)
    if torch.cuda.is_available():  # float maths on another device: equal to rounding
        for ours, theirs in zip(transform.finish(groups, "cuda"), views):
            torch.testing.assert_close(ours.cpu(), theirs, rtol=0, atol=1e-4)
