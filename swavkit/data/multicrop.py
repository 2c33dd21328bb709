"""SwAV multi-crop augmentation: geometry per image, colour per batch.

Each crop: RandomResizedCrop(size, scale, ratio 3/4..4/3) -> horizontal flip p=0.5 -> ColorJitter(0.8s,
0.8s, 0.8s, 0.2s) with probability p and a random order of its four ops -> grayscale p -> Gaussian blur
p (sigma 0.1..2, kernel ~10% of the crop) -> normalise. This is the distribution of the SwAV reference
and of torchvision's transforms, split in two halves so that it is cheap on small images:

* ``MultiCropTransform.__call__`` (per image, in the DataLoader workers) draws every random number of
  every crop in ONE call of torch's default generator, cuts and resizes the crops with PIL's C resampler
  (which antialiases like ``antialias=True``) and flips them. It returns uint8 crops plus a small
  parameter vector per crop describing the colour ops still to apply.
* ``MultiCropTransform.collate`` (per batch, still in the workers) applies the colour ops to all crops
  of one resolution at once, each crop with its own factors.
* Or, with ``data.colour_on_device``, the workers only stack the uint8 crops and their parameters
  (``collate_pixels``) and the training process applies the same colour ops on its device (``finish``):
  a quarter of the bytes cross to the GPU, and the workers keep only decoding and cutting. The two
  routes run the same code on the same numbers, so on a CPU they give identical crops.
* Or, with ``data.decode_on_device``, the workers send JPEG files still encoded with their crops' random
  choices (``geometry``, the same single draw as ``__call__``), and the training process decodes, cuts,
  flips and colours them on its device (swavkit.data.device_decode).

Why: on 32 px images the per-crop tensor ops of a torchvision pipeline are almost all call overhead
(ColorJitter's hue round trip alone is ~0.3 ms per crop); batched, that cost is shared by the whole
batch (benchmarks/README.md, "vs lightly, data"). Because every random number is drawn in the per-image
half from the per-sample seeded generator (see ``UnlabeledImageFolder``), a sample's crops are a
function of (seed, epoch, index) only - not of the batch it lands in, the number of workers or of
processes - which is what makes resume and multi-process runs exact.

The colour maths runs in float on [0, 1] images and matches torchvision's functional ops on float
images (tests/test_multicrop.py); unlike a uint8 pipeline it does not re-quantise after every op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.data
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from swavkit.data.constants import IMAGENET_MEAN, IMAGENET_STD

# Layout of the per-crop colour parameter vector.
P_JITTER, P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 0, 1, 2, 3, 4
P_ORDER = 5  # 4 slots: which jitter op runs at each position
P_GRAY, P_BLUR, P_SIGMA = 9, 10, 11
N_PARAMS = 12
# Layout of the per-crop uniforms: 0-19 RandomResizedCrop tries (area, log-ratio) x 10, 20-21 position,
# 22 flip, 23 jitter?, 24-27 op order keys, 28-31 jitter factors, 32 gray?, 33 blur?, 34 sigma.
N_UNIFORMS = 35
RRC_TRIES = 10
LOG_RATIO_RANGE = (math.log(3 / 4), math.log(4 / 3))
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


class MultiCropTransform:
    """PIL image -> list of V (uint8 crop [3, s_v, s_v], colour parameters [N_PARAMS]), large crops first.

    Pair it with ``collate`` as the DataLoader's ``collate_fn``; the collated batch is
    (V float tensors [B, 3, s_v, s_v] normalised, indices [B], skipped files).
    """

    def __init__(self, counts, sizes_px, min_scales, max_scales, color_jitter_strength=1.0,
                 color_jitter_probability=0.8, grayscale_probability=0.2, blur_probability=0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        s = float(color_jitter_strength)
        self.jitter_strengths = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.jitter_probability = float(color_jitter_probability) if s > 0 else 0.0
        self.grayscale_probability = float(grayscale_probability)
        self.blur_probability = float(blur_probability)
        self.crops = [(int(size), (float(lo), float(hi)))
                      for count, size, lo, hi in zip(counts, sizes_px, min_scales, max_scales) for _ in range(count)]
        # [1, C, 1, 1]: 3 for RGB, data.channels for the array route (swavkit.data.channels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def from_config(cls, crops_cfg) -> "MultiCropTransform":
        c = crops_cfg
        return cls(c.counts, c.sizes_px, c.min_scales, c.max_scales, c.color_jitter_strength,
                   c.color_jitter_probability, c.grayscale_probability, c.blur_probability, c.mean, c.std)

    # ---- per image (geometry) ----------------------------------------------------------------------

    def __call__(self, image: Image.Image) -> list[tuple[torch.Tensor, torch.Tensor]]:
        crops = []
        for size, (box, flip, params) in zip(self.sizes_px, self.geometry(*image.size)):
            crop = image.resize((size, size), Image.BILINEAR, box=box)
            if flip:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crops.append((TF.pil_to_tensor(crop), params))
        return crops

    @property
    def sizes_px(self) -> list[int]:
        """The side of each of the V crops, large crops first."""
        return [size for size, _ in self.crops]

    def geometry(self, width: int, height: int) -> list[tuple[tuple[int, int, int, int], bool, torch.Tensor]]:
        """Every random choice for one image of ``width`` x ``height`` px -> per crop (PIL box (left, top,
        right, bottom), flip?, colour parameters [N_PARAMS]). One call of torch's default generator, so
        the PIL route (``__call__``) and the decode-on-device route (swavkit.data.device_decode) draw the
        same crops from the same per-sample seed."""
        uniforms = torch.rand(len(self.crops), N_UNIFORMS).tolist()  # the only RNG call for this image
        return [(crop_box(width, height, scale, u), u[22] < 0.5, self.colour_parameters(u))
                for (_, scale), u in zip(self.crops, uniforms)]

    def colour_parameters(self, u: list[float]) -> torch.Tensor:
        """The colour ops of one crop from its uniforms -> [N_PARAMS] (see the P_* layout)."""
        p = [0.0] * N_PARAMS
        if u[23] < self.jitter_probability:
            p[P_JITTER] = 1.0
            # torchvision's random permutation of the four ops, drawn as the argsort of four uniforms
            p[P_ORDER:P_ORDER + 4] = [float(op) for op in sorted(range(4), key=lambda op: u[24 + op])]
            for slot, (strength, v) in enumerate(zip(self.jitter_strengths[:3], u[28:31])):
                low = max(0.0, 1.0 - strength)
                p[P_BRIGHTNESS + slot] = low + (1.0 + strength - low) * v
            hue = self.jitter_strengths[3]
            p[P_HUE] = -hue + 2.0 * hue * u[31]
        if u[32] < self.grayscale_probability:
            p[P_GRAY] = 1.0
        if u[33] < self.blur_probability:
            p[P_BLUR] = 1.0
            p[P_SIGMA] = 0.1 + 1.9 * u[34]
        return torch.tensor(p)

    # ---- per batch (colour) ------------------------------------------------------------------------

    def collate(self, items):
        """[(crops, index, skipped)] from UnlabeledImageFolder -> (V normalised float tensors
        [B, 3, s_v, s_v], indices [B], skipped list).

        Runs in the DataLoader workers (one thread each), or with num_workers=0 in the training process
        at its torch thread count."""
        groups, indices, skipped = self.collate_pixels(items)
        return self.finish(groups), indices, skipped

    def collate_pixels(self, items):
        """The first half of ``collate``: [(crops, index, skipped)] -> (groups, indices [B], skipped),
        one group per resolution: (uint8 crops [n_g * B, 3, s_g, s_g] view-major, parameters
        [n_g * B, N_PARAMS], n_g). ``finish`` turns the groups into the V views, on any device."""
        n_views = len(items[0][0])
        groups, start = [], 0
        while start < n_views:
            end = start
            while end < n_views and items[0][0][end][0].shape[-2:] == items[0][0][start][0].shape[-2:]:
                end += 1
            groups.append((torch.stack([item[0][v][0] for v in range(start, end) for item in items]),
                           torch.stack([item[0][v][1] for v in range(start, end) for item in items]), end - start))
            start = end
        indices = torch.tensor([item[1] for item in items])
        skipped = [entry for item in items for entry in item[2]]
        return groups, indices, skipped

    def finish(self, groups, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Groups from ``collate_pixels`` -> V normalised float views [B, 3, s_v, s_v] on ``device``
        (default: where the pixels are), one vectorised colour pass per group. The parameters stay on
        the CPU: which crops get which op is decided there, so a GPU needs no host sync for it."""
        views = []
        for pixels, params, n_views in groups:
            x = pixels.to(device if device is not None else pixels.device, non_blocking=True).float()
            if pixels.dtype == torch.uint8:  # the array route's crops are float in [0, 1] already (16-bit kept)
                x.div_(255)
            views += list(self.colour(x, params.cpu()).split(len(params) // n_views))
        return views

    def colour(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] floats in [0, 1] (modified in place), p [N, N_PARAMS] -> normalised [N, 3, H, W].

        ``x`` may live on any device; ``p`` should be on the CPU. Which crops get which op is decided
        there, and all the batch's indices and all its factors cross to the device in two copies, so
        nothing here waits for the device."""
        jitter = p[:, P_JITTER] > 0
        order = p[:, P_ORDER:P_ORDER + 4].long()
        # (op, rows, parameter column) in the order the ops apply: jitter position by position, gray, blur
        ops = [(op, (jitter & (order[:, position] == op)).nonzero().squeeze(1), P_BRIGHTNESS + op)
               for position in range(4) for op in range(4)]
        ops.append(("gray", (p[:, P_GRAY] > 0).nonzero().squeeze(1), P_GRAY))
        ops.append(("blur", (p[:, P_BLUR] > 0).nonzero().squeeze(1), P_SIGMA))
        all_rows = torch.cat([rows for _, rows, _ in ops]).to(x.device, non_blocking=True)
        factors = torch.cat([p[rows, column] for _, rows, column in ops]).to(x.device, non_blocking=True)
        start = 0
        for op, rows, _ in ops:
            n = rows.numel()
            idx, factor = all_rows[start:start + n], factors[start:start + n]
            start += n
            if not n:
                continue
            if op == "gray":
                x[idx] = grayscale(x[idx]).expand(-1, 3, -1, -1)
            elif op == "blur":
                x[idx] = gaussian_blur(x[idx], factor, blur_kernel_px(x.shape[-1]))
            else:
                x[idx] = JITTER_OPS[op](x[idx], factor.view(-1, 1, 1, 1))
        mean, std = self._normalisation(x.device)
        return x.sub_(mean).div_(std)

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std [1, 3, 1, 1] on ``device``, copied there once."""
        cached = self.__dict__.setdefault("_on_device", {})
        if device not in cached:
            cached[device] = (self.mean.to(device), self.std.to(device))
        return cached[device]

    def __getstate__(self):  # DataLoader workers get the CPU tensors only
        return {k: v for k, v in self.__dict__.items() if k != "_on_device"}


def blur_kernel_px(size_px: int) -> int:
    """Gaussian blur kernel of a crop: ~10% of its side, odd, at least 3."""
    return max(3, int(0.1 * size_px) // 2 * 2 + 1)


def crop_box(width: int, height: int, scale: tuple[float, float], u: list[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (ratio 3/4..4/3, 10 tries, then a central crop), fed
    from the uniforms ``u`` instead of the global RNG -> PIL box (left, top, right, bottom)."""
    area = width * height
    lo, hi = scale
    for t in range(RRC_TRIES):
        target_area = area * (lo + (hi - lo) * u[2 * t])
        aspect = math.exp(LOG_RATIO_RANGE[0] + (LOG_RATIO_RANGE[1] - LOG_RATIO_RANGE[0]) * u[2 * t + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[20] * (height - h + 1)), height - h)
            left = min(int(u[21] * (width - w + 1)), width - w)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


# ---- colour ops on float images [N, 3, H, W] in [0, 1], one factor per image ([N, 1, 1, 1]) ----------

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> luma [N, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (a * factor + b * (1 - factor)).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def _hsv_offsets(x: torch.Tensor) -> torch.Tensor:
    """[1, 3, 1, 1] float32 = 5, 3, 1 (r, g, b), made on x's device (no host-to-device copy)."""
    return torch.arange(5.0, 0.0, -2.0, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` (fraction of the circle, in [-0.5, 0.5]); torchvision's rgb->hsv maths."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    grey = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(grey, ones, maxc)
    chroma_safe = torch.where(grey, ones, chroma)
    rc, gc, bc = (maxc - r) / chroma_safe, (maxc - g) / chroma_safe, (maxc - b) / chroma_safe
    hue = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
           + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    hue = torch.remainder(hue + factor.view(-1, 1, 1), 1.0)
    # hsv -> rgb without branches: channel = v (1 - s clamp(min(k, 4 - k), 0, 1)), k = (n + 6h) mod 6,
    # n = 5, 3, 1 for r, g, b
    k = torch.remainder(_hsv_offsets(x) + (hue * 6.0).unsqueeze(1), 6.0)
    return (maxc.unsqueeze(1) * (1 - saturation.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0, 1))).clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_px: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image ([N]), reflect padding as torchvision."""
    n, c, h, w = x.shape
    half = (kernel_px - 1) * 0.5
    t = torch.linspace(-half, half, kernel_px, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [n*c, kernel]
    pad = kernel_px // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_px), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, kernel_px, 1), groups=n * c)
    return y.view(n, c, h, w)


__all__ = ["MultiCropTransform", "crop_box", "blur_kernel_px", "grayscale", "adjust_brightness",
           "adjust_contrast", "adjust_saturation", "adjust_hue", "gaussian_blur", "JITTER_OPS", "N_PARAMS"]
