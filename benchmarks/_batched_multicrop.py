"""Benchmark-local PROTOTYPE of a faster multi-crop pipeline (a recommendation for swavkit/data.py).

Measured by bench_vs_lightly.py next to the library's MultiCropTransform; not used by swavkit itself.

Idea: per image, only the geometric part runs (random resized crop + flip, with PIL's C resampler, which
antialiases like ``antialias=True``), and every random number of every crop is drawn there in ONE call
of the per-sample-seeded torch RNG, so augmentation stays a function of (seed, epoch, index) whatever the
number of workers. The colour part (ColorJitter with a random op order per crop, grayscale, Gaussian
blur, normalisation) runs once per batch in the collate function (i.e. still inside the workers),
vectorised over all crops of one size with per-crop factors. On 32 px images the per-image tensor ops
of MultiCropTransform are dominated by per-call overhead (ColorJitter alone is ~0.3-0.5 ms per crop,
mostly the hue rgb->hsv->rgb round trip); batched, that cost is shared by the whole batch.

Distribution: that of MultiCropTransform (RRC scale/ratio with torchvision's 10 tries + central fallback,
flip 0.5, jitter (0.8s, 0.8s, 0.8s, 0.2s) with p and a random op order per crop, grayscale p, blur p with
sigma U(0.1, 2) and a kernel of ~10% of the crop), computed in float instead of re-quantising to uint8
after every op. Each colour op matches torchvision's functional op on float images to < 1e-6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.data
from PIL import Image
from torchvision.transforms.v2 import functional as TF

# per-crop parameter vector layout
P_CJ, P_B, P_C, P_S, P_H, P_ORDER, P_GRAY, P_BLUR, P_SIGMA = 0, 1, 2, 3, 4, 5, 9, 10, 11
N_PARAMS = 12
# per-crop uniforms: 0-19 RRC tries (scale, ratio), 20-21 position, 22 flip, 23 jitter?, 24-27 order,
# 28-31 factors, 32 gray?, 33 blur?, 34 sigma
N_RANDOM = 35
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


class BatchedMultiCrop:
    """PIL image -> list of V (uint8 crop [3, s, s], params [N_PARAMS]); pair with ``collate``."""

    def __init__(self, counts, sizes_px, min_scales, max_scales, color_jitter_strength=1.0,
                 color_jitter_probability=0.8, grayscale_probability=0.2, blur_probability=0.5,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        s = color_jitter_strength
        self.jitter = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.p_jitter = color_jitter_probability if s > 0 else 0.0
        self.p_gray, self.p_blur = grayscale_probability, blur_probability
        self.crops = [(size, (lo, hi)) for count, size, lo, hi in zip(counts, sizes_px, min_scales, max_scales)
                      for _ in range(count)]
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, image: Image.Image):
        width, height = image.size
        u = torch.rand(len(self.crops), N_RANDOM).tolist()  # the only RNG call for this image
        out = []
        for (size, scale), r in zip(self.crops, u):
            crop = image.resize((size, size), Image.BILINEAR, box=_crop_box(width, height, scale, r))
            if r[22] < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out.append((TF.pil_to_tensor(crop), self._params(r)))
        return out

    def _params(self, r: list[float]) -> torch.Tensor:
        p = [0.0] * N_PARAMS
        b, c, s, h = self.jitter
        if r[23] < self.p_jitter:
            p[P_CJ] = 1.0
            p[P_ORDER:P_ORDER + 4] = [float(k) for k in sorted(range(4), key=lambda k: r[24 + k])]
            for slot, (strength, u) in enumerate(zip((b, c, s), r[28:31])):
                low = max(0.0, 1 - strength)
                p[P_B + slot] = low + (1 + strength - low) * u
            p[P_H] = -h + 2 * h * r[31]
        if r[32] < self.p_gray:
            p[P_GRAY] = 1.0
        if r[33] < self.p_blur:
            p[P_BLUR] = 1.0
            p[P_SIGMA] = 0.1 + 1.9 * r[34]
        return torch.tensor(p)

    # ---- batch side --------------------------------------------------------------------------------

    def collate(self, items):
        """[(crops_with_params, index, skipped)] -> (V float tensors [B, 3, s, s], indices [B], skipped),
        the contract of swavkit.data.collate_crops.

        In the training process (num_workers=0) the batch ops run single-threaded: there they compete
        with the model for the same cores, and on a busy machine every multi-threaded op of a few
        hundred microseconds can stall for a scheduler time slice."""
        if torch.utils.data.get_worker_info() is None and torch.get_num_threads() > 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return self._collate(items)
            finally:
                torch.set_num_threads(threads)
        return self._collate(items)

    def _collate(self, items):
        V, B = len(items[0][0]), len(items)
        pixels = [torch.stack([item[0][v][0] for item in items]) for v in range(V)]
        params = [torch.stack([item[0][v][1] for item in items]) for v in range(V)]
        out: list = [None] * V
        v = 0
        while v < V:  # one vectorised pass per resolution group
            end = v
            while end < V and pixels[end].shape[-2:] == pixels[v].shape[-2:]:
                end += 1
            x = self.colour(torch.cat(pixels[v:end]).float().div_(255), torch.cat(params[v:end]))
            for k, chunk in enumerate(x.split(B)):
                out[v + k] = chunk
            v = end
        indices = torch.tensor([item[1] for item in items])
        skipped = [entry for item in items for entry in item[2]]
        return out, indices, skipped

    def colour(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] floats in [0, 1], p [N, N_PARAMS] -> normalised [N, 3, H, W]."""
        jitter = p[:, P_CJ] > 0
        order = p[:, P_ORDER:P_ORDER + 4].long()
        for position in range(4):
            for op in range(4):
                idx = (jitter & (order[:, position] == op)).nonzero().squeeze(1)
                if idx.numel():
                    x[idx] = _JITTER_OPS[op](x[idx], p[idx, P_B + op].view(-1, 1, 1, 1))
        idx = (p[:, P_GRAY] > 0).nonzero().squeeze(1)
        if idx.numel():
            x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
        idx = (p[:, P_BLUR] > 0).nonzero().squeeze(1)
        if idx.numel():
            x[idx] = _blur(x[idx], p[idx, P_SIGMA], max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1))
        return x.sub_(self.mean).div_(self.std)


def _crop_box(width: int, height: int, scale, r: list[float]) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params (ratio 3/4..4/3), fed from the uniforms r."""
    area = width * height
    lo, hi = scale
    for t in range(10):
        target_area = area * (lo + (hi - lo) * r[2 * t])
        aspect = math.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * r[2 * t + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = min(int(r[20] * (height - h + 1)), height - h)
            j = min(int(r[21] * (width - w + 1)), width - w)
            return j, i, j + w, i + h
    ratio = width / height  # fallback: central crop
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    i, j = (height - h) // 2, (width - w) // 2
    return j, i, j + w, i + h


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a, b, f):
    return (a * f + b * (1 - f)).clamp_(0, 1)


def _brightness(x, f):
    return (x * f).clamp_(0, 1)


def _contrast(x, f):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x, f):
    return _blend(x, _gray(x), f)


_HSV_N = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def _hue(x, f):
    """Shift the hue by f (fraction of the circle), one f per sample; torchvision's rgb->hsv maths."""
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    # hsv -> rgb: channel = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = (5, 3, 1) for (r, g, b)
    k = torch.remainder(_HSV_N + (h * 6.0).unsqueeze(1), 6.0)
    return (maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0, 1))).clamp_(0, 1)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, reflect padding (as torchvision)."""
    n, c, h, w = x.shape
    half = (kernel - 1) * 0.5
    t = torch.linspace(-half, half, kernel)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [n*c, kernel]
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, h, w)


__all__ = ["BatchedMultiCrop"]
